"""Properties of the model: masking, caching, decoding, tying and initialisation."""

from __future__ import annotations

import math
import types

import pytest
import torch
from conftest import DEVICES
from torch import nn

from transformer.config import ConfigError, ModelConfig
from transformer.data.batching import Batch, padding_mask, target_mask
from transformer.inference.search import greedy_decode
from transformer.model import make_model
from transformer.model.attention import MultiHeadedAttention, attention
from transformer.training.checkpoint import build_model
from transformer.training.loss import LabelSmoothing

V, PAD, BOS, EOS = 11, 0, 1, 2
VARIANTS = [(n, a) for n in ("pre", "post") for a in ("sdpa", "explicit")]


def tiny(norm="pre", attention="sdpa", dropout=0.0, **kw):
    return make_model(V, V, N=2, d_model=32, d_ff=64, h=4, dropout=dropout, norm=norm, attention=attention, **kw)


def padded(lengths, width, low=3):
    """Random ids in [low, V) with right padding to ``width``; shape (len(lengths), width)."""
    x = torch.randint(low, V, (len(lengths), width))
    for i, n in enumerate(lengths):
        x[i, n:] = PAD
    return x


def source():
    src = padded([7, 4, 6, 2], 7)
    return src, padding_mask(src, PAD)


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("norm,attn", VARIANTS)
def test_decoder_is_causal(norm, attn):
    """Changing target tokens at positions >= t leaves outputs at positions < t unchanged."""
    torch.manual_seed(0)
    model = tiny(norm, attn).double().eval()
    src, src_mask = source()
    tgt = padded([8] * 4, 8, low=1)
    memory = model.encode(src, src_mask)
    t = 3
    changed = tgt.clone()
    changed[:, t:] = torch.randint(1, V, changed[:, t:].shape)
    changed[:, t] = tgt[:, t] % (V - 1) + 1  # surely differs at t
    a = model.generator(model.decode(memory, src_mask, tgt, target_mask(tgt, PAD)))
    b = model.generator(model.decode(memory, src_mask, changed, target_mask(changed, PAD)))
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-4  # the change is visible where allowed


@pytest.mark.parametrize("norm,attn", VARIANTS)
def test_extra_source_padding_changes_nothing(norm, attn):
    """Appending padding to the source leaves encoder outputs (first S positions) and decoder outputs unchanged."""
    torch.manual_seed(0)
    model = tiny(norm, attn).double().eval()
    src, src_mask = source()
    longer = torch.cat([src, torch.full((src.size(0), 3), PAD)], dim=1)
    longer_mask = padding_mask(longer, PAD)
    tgt = padded([5, 3, 5, 1], 5, low=1)
    mem, mem2 = model.encode(src, src_mask), model.encode(longer, longer_mask)
    torch.testing.assert_close(mem2[:, : src.size(1)], mem, atol=1e-6, rtol=0)
    out = model.decode(mem, src_mask, tgt, target_mask(tgt, PAD))
    out2 = model.decode(mem2, longer_mask, tgt, target_mask(tgt, PAD))
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("train", [False, True])
def test_sdpa_and_explicit_attention_agree(norm, train):
    """With the same weights, attention='sdpa' and 'explicit' give the same outputs (eval, and train with dropout 0)."""
    torch.manual_seed(0)
    fused = tiny(norm, "sdpa").double()
    explicit = tiny(norm, "explicit").double()
    explicit.load_state_dict(fused.state_dict())
    fused.train(train)
    explicit.train(train)
    src, src_mask = source()
    tgt = padded([6, 2, 4, 6], 6, low=1)
    a = fused.generator(fused(src, tgt, src_mask, target_mask(tgt, PAD)))
    b = explicit.generator(explicit(src, tgt, src_mask, target_mask(tgt, PAD)))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_explicit_attention_weights_are_masked_distributions():
    """attention() weights sum to 1 over keys and are exactly 0 on masked keys."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.4
    mask[..., 0] = True  # at least one visible key per row
    out, p = attention(q, k, v, mask=mask)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    assert (p.masked_select(~mask.expand_as(p)) == 0).all()
    assert (p.masked_select(mask.expand_as(p)) > 0).all()
    torch.testing.assert_close(out, p @ v)


# --------------------------------------------------------------------------- incremental decoding


def cache_setup(seed=0):
    torch.manual_seed(seed)
    model = tiny().eval()
    src, src_mask = source()
    tgt = torch.cat([torch.full((4, 1), BOS), padded([7, 4, 7, 5], 7)], dim=1)  # (4, 8), padded targets
    memory = model.encode(src, src_mask)
    full = model.decode(memory, src_mask, tgt, target_mask(tgt, PAD))
    return model, memory, src_mask, tgt, full


def feed(model, memory, src_mask, tgt, sizes, cache=None):
    cache = cache if cache is not None else model.new_cache()
    outs, t = [], 0
    for n in sizes:
        out, cache = model.decode(memory, src_mask, tgt[:, t : t + n], None, cache)
        outs.append(out)
        t += n
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("sizes", [[1] * 8, [2, 2, 2, 2], [3, 3, 2], [1, 3, 2, 2], [8]])
def test_cached_decoding_matches_full_recomputation(sizes):
    """Feeding the target through the cache one token or a few at a time gives the full pass's outputs."""
    model, memory, src_mask, tgt, full = cache_setup()
    with torch.no_grad():
        inc, cache = feed(model, memory, src_mask, tgt, sizes)
    assert cache.length == tgt.size(1)
    real = tgt != PAD  # at padded target positions the two masks differ on purpose
    torch.testing.assert_close(inc[real], full[real], atol=1e-5, rtol=0)


def test_cached_keys_and_values_are_contiguous():
    """The cache keeps its tensors contiguous: a view of the (B, T, h, d_k) projection
    would be copied by every later step's batched product (it once cost a third of
    greedy decoding's time)."""
    model, memory, src_mask, tgt, _ = cache_setup()
    with torch.no_grad():
        _, cache = feed(model, memory, src_mask, tgt, [1, 1])
    for layer in cache.layers:
        for kv in (layer.self_attn, layer.src_attn):
            assert kv.k.is_contiguous() and kv.v.is_contiguous()


def test_cache_reorder_follows_the_permutation():
    """After cache.reorder(index), further steps give the full pass's outputs for the rows in index order."""
    model, memory, src_mask, tgt, full = cache_setup(1)
    index = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        first, cache = feed(model, memory, src_mask, tgt, [1, 2])
        cache.reorder(index)
        rest, _ = feed(model, memory[index], src_mask[index], tgt[index, 3:], [1, 2, 2], cache)
    real = tgt[index] != PAD
    got = torch.cat([first[index], rest], dim=1)
    torch.testing.assert_close(got[real], full[index][real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_rows_sharing_an_encoder_row_equal_repeated_rows(use_cache):
    """Beam search keeps one encoder row per sentence for its k hypotheses (query rows
    g*k ... g*k + k - 1): the decoder then gives what it gives with the rows repeated."""
    model, memory, src_mask, _, _ = cache_setup(2)
    k = 3
    torch.manual_seed(3)
    tgt = torch.randint(3, 11, (4 * k, 5))
    with torch.no_grad():
        if use_cache:
            shared, _ = feed(model, memory, src_mask, tgt, [1, 1, 3])
            repeated, _ = feed(model, memory.repeat_interleave(k, 0), src_mask.repeat_interleave(k, 0), tgt, [1, 1, 3])
        else:
            causal = target_mask(tgt, PAD)
            shared = model.decode(memory, src_mask, tgt, causal)
            repeated = model.decode(memory.repeat_interleave(k, 0), src_mask.repeat_interleave(k, 0), tgt, causal)
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot share"):
        model.decode(memory, src_mask, tgt[:5], target_mask(tgt[:5], PAD))


# --------------------------------------------------------------------------- greedy search


def decode_setup(seed=0):
    torch.manual_seed(seed)
    model = tiny().double().eval()
    src = padded([7, 3, 5, 1], 7)
    return model, src, padding_mask(src, PAD)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_cache_matches_no_cache(device):
    """greedy_decode gives the same ids with and without the cache (varied source lengths)."""
    model, src, src_mask = decode_setup()
    model, src, src_mask = model.to(device), src.to(device), src_mask.to(device)
    a = greedy_decode(model, src, src_mask, 12, BOS, use_cache=True)
    b = greedy_decode(model, src, src_mask, 12, BOS, use_cache=False)
    assert a.shape == (4, 13)
    assert torch.equal(a, b)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_pads_after_end_symbol(use_cache):
    """With end_symbol, each row is the free-running output up to its first end_symbol, then all pad."""
    model, src, src_mask = decode_setup(3)
    free = greedy_decode(model, src, src_mask, 10, BOS, use_cache=use_cache)
    end = int(free[0, 3])  # a token that does occur
    ys = greedy_decode(model, src, src_mask, 10, BOS, end_symbol=end, use_cache=use_cache)
    for row, free_row in zip(ys, free):
        hits = (free_row[1:] == end).nonzero()
        stop = int(hits[0]) + 2 if len(hits) else free_row.numel()  # index just past the first end
        assert torch.equal(row[:stop], free_row[:stop])
        assert (row[stop:] == PAD).all()
    assert ys.size(1) <= free.size(1)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_stops_early_when_every_row_ends(use_cache):
    """A model that always predicts end_symbol stops after one step, well before max_len + 1."""
    model, src, src_mask = decode_setup()
    with torch.no_grad():
        model.generator.proj.weight.zero_()
        model.generator.proj.bias.zero_()
        model.generator.proj.bias[EOS] = 50.0
    ys = greedy_decode(model, src, src_mask, 10, BOS, end_symbol=EOS, use_cache=use_cache)
    assert ys.tolist() == [[BOS, EOS]] * 4


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_per_sentence_max_len(use_cache):
    """A per-sentence max_len tensor gives each row exactly that many non-pad generated tokens."""
    model, src, src_mask = decode_setup()
    limits = torch.tensor([1, 4, 6, 2])
    ys = greedy_decode(model, src, src_mask, limits, BOS, use_cache=use_cache)
    assert ys.size(1) == 1 + int(limits.max())
    assert (ys[:, 1:] != PAD).sum(1).tolist() == limits.tolist()


# --------------------------------------------------------------------------- construction


def test_tied_embeddings_share_storage_through_training():
    """tie_embeddings=True shares one matrix among both embeddings and the generator, also after an Adam step."""
    torch.manual_seed(0)
    model = tiny(tie_embeddings=True)
    weights = lambda: [model.src_embed[0].lut.weight, model.tgt_embed[0].lut.weight, model.generator.proj.weight]
    before = model.generator.proj.weight.detach().clone()
    assert len({w.data_ptr() for w in weights()}) == 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = Batch(*copy_batch())
    out = model.generator(model(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask))
    LabelSmoothing(V, PAD, 0.1)(out.reshape(-1, V), batch.tgt_out.reshape(-1)).backward()
    opt.step()
    assert len({w.data_ptr() for w in weights()}) == 1
    assert not torch.equal(model.src_embed[0].lut.weight, before)


def test_tied_embeddings_need_one_vocabulary():
    """make_model with tie_embeddings and different vocab sizes raises ValueError naming the vocabulary."""
    with pytest.raises(ValueError, match="vocabulary"):
        make_model(V, V + 1, N=1, d_model=32, d_ff=64, h=4, tie_embeddings=True)


def test_build_model_rejects_tying_without_shared_vocab():
    """build_model(tie_embeddings=True) with a per-side tokenizer raises ConfigError naming model.tie_embeddings."""
    cfg = ModelConfig(N=1, d_model=32, d_ff=64, h=4, tie_embeddings=True, max_len=64)
    tok = types.SimpleNamespace(kind="fake", src_vocab_size=V, tgt_vocab_size=V, shared_vocab=False)
    with pytest.raises(ConfigError, match=r"model\.tie_embeddings"):
        build_model(cfg, tok)
    shared = types.SimpleNamespace(kind="fake", src_vocab_size=V, tgt_vocab_size=V, shared_vocab=True)
    model = build_model(cfg, shared)
    assert model.generator.proj.weight.data_ptr() == model.src_embed[0].lut.weight.data_ptr()


def test_attention_dropout_follows_argument():
    """make_model(dropout=0.3) gives every MultiHeadedAttention's dropout p == 0.3."""
    model = tiny(dropout=0.3)
    heads = [m for m in model.modules() if isinstance(m, MultiHeadedAttention)]
    assert len(heads) == 6  # 2 encoder self, 2 decoder self, 2 decoder source
    assert all(m.dropout.p == 0.3 for m in heads)


def copy_batch(batch=16, length=8):
    src = torch.randint(3, V, (batch, length))
    src[:, 0] = BOS
    return src, src.clone()


@pytest.mark.parametrize("norm,final", [("pre", nn.LayerNorm), ("post", nn.Identity)])
def test_norm_variants_have_right_final_norm_and_train(norm, final):
    """Post-norm has no final norm, pre-norm has a LayerNorm; both reduce the loss over 30 Adam steps."""
    torch.manual_seed(0)
    model = tiny(norm)
    assert type(model.encoder.norm) is final and type(model.decoder.norm) is final
    batch = Batch(*copy_batch())
    crit = LabelSmoothing(V, PAD, 0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    losses = []
    for _ in range(30):
        out = model.generator(model(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask))
        loss = crit(out.reshape(-1, V), batch.tgt_out.reshape(-1)) / batch.ntokens
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("tie", [False, True])
def test_matrices_are_xavier_uniform(tie):
    """Every parameter with dim > 1 lies within ±sqrt(6/(fan_in+fan_out)) and reaches near that bound."""
    torch.manual_seed(0)
    model = tiny(tie_embeddings=tie)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            fan_out, fan_in = p.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert p.abs().max() <= bound, name
            assert p.abs().max() > 0.9 * bound, name  # not a narrower default init
