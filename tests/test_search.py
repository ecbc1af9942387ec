"""Beam search and the Translator: equivalences with greedy and rescoring, exactness,
n-best, ordering and bad input."""

from __future__ import annotations

import copy
import functools
import itertools
import logging

import pytest
import torch
from conftest import DEVICES
from torch import nn

from transformer.config import ConfigError, DecodeConfig
from transformer.data.batching import padding_mask
from transformer.fast.decoding import LogitBuffer, encode_in_pieces, logsumexp_rows
from transformer.fast.packed import PackedFeedForward, PackedLinear, can_pack, packed_copy
from transformer.inference.search import beam_search, greedy_decode, length_penalty, rescore
from transformer.inference.translator import Translator
from transformer.model import PositionwiseFeedForward, make_model

PAD, BOS, EOS = 0, 1, 2


def model(vocab=11, seed=0, N=2):
    """An untrained model in float64 (so that no two scores tie): its distributions are
    peaked enough, through random weights, to make the searches differ."""
    torch.manual_seed(seed)
    m = make_model(vocab, vocab, N=N, d_model=32, d_ff=64, h=4, dropout=0.0).double().eval()
    return m


def source(vocab=11, lengths=(7, 4, 6, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    for i, n in enumerate(lengths):
        src[i, n:] = PAD
    return src, padding_mask(src, PAD)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_beam_size_one_is_greedy(seed, use_cache, device):
    m = model(seed=seed).to(device)
    src, mask = (t.to(device) for t in source(seed=seed))
    limits = torch.tensor([9, 5, 12, 3], device=device)
    ys = greedy_decode(m, src, mask, limits, BOS, EOS, PAD, use_cache)
    found = beam_search(m, src, mask, limits, BOS, EOS, beam_size=1, use_cache=use_cache)
    for row, hyps in zip(ys.tolist(), found):
        words = [w for w in row[1:] if w != PAD]
        assert hyps[0].tokens == [w for w in itertools.takewhile(lambda w: w != EOS, words)]


@pytest.mark.parametrize("tokens", [1, 7, 14, 1000])
def test_encoding_a_few_rows_at_a_time_changes_nothing(tokens):
    """Pieces of rows, each only as wide as its longest row: the same states at every
    real position (what padding holds does not matter: the mask hides it)."""
    m = model(seed=2)
    src, mask = source(lengths=(7, 4, 6, 2, 5), seed=2)  # by length: 2, 4, 5, 6, 7
    whole = m.encode(src, mask)
    pieces = encode_in_pieces(m, src, mask, tokens=tokens)
    real = mask[:, 0].unsqueeze(-1).expand_as(whole)
    assert pieces.shape == whole.shape
    assert torch.allclose(pieces[real], whole[real], rtol=0, atol=1e-12)


def test_beam_search_buffers_give_the_plain_results():
    """The logits written into one reused buffer equal the plain call, and logsumexp a few
    rows at a time (through softmax) equals torch's to float32's rounding."""
    m = model(seed=3)
    hidden = torch.randn(300, 32, dtype=torch.float64)
    project = LogitBuffer(m, 300, torch.device("cpu"))
    with torch.no_grad():  # as in beam search: writing into a buffer has no gradient
        for rows in (300, 7):  # the buffer is reused by a smaller step
            torch.testing.assert_close(project(hidden[:rows]), m.logits(hidden[:rows]), rtol=0, atol=1e-12)
    logits = torch.randn(300, 11, dtype=torch.float64)
    torch.testing.assert_close(logsumexp_rows(logits), logits.logsumexp(dim=1, keepdim=True), rtol=0, atol=1e-12)
    # float32 rows as beam search has them: wide, with a large spread, one row of equal values
    logits = torch.randn(100, 8000, generator=torch.Generator().manual_seed(0)) * 5
    logits[3] = 7.0
    exact = logits.double().logsumexp(dim=1, keepdim=True)
    torch.testing.assert_close(logsumexp_rows(logits).double(), exact, rtol=4e-7, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_cached_beam_search_matches_uncached(alpha):
    m = model(seed=1)
    src, mask = source(seed=1)
    a = beam_search(m, src, mask, 10, BOS, EOS, beam_size=4, alpha=alpha, nbest=4, use_cache=True)
    b = beam_search(m, src, mask, 10, BOS, EOS, beam_size=4, alpha=alpha, nbest=4, use_cache=False)
    assert [[h.tokens for h in hyps] for hyps in a] == [[h.tokens for h in hyps] for hyps in b]
    for ha, hb in zip(itertools.chain(*a), itertools.chain(*b)):
        assert ha.score == pytest.approx(hb.score, abs=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_scores_equal_the_models_rescoring(alpha):
    """Each hypothesis' score is the model's own log-probability of it (with </s> when it
    ended) divided by the length penalty; those cut at the limit included."""
    m = model(seed=2)
    src, mask = source(seed=2)
    found = beam_search(m, src, mask, 6, BOS, EOS, beam_size=5, alpha=alpha, nbest=5)
    rows, hyps = zip(*[(i, h) for i, hs in enumerate(found) for h in hs])
    index = torch.tensor(rows)
    ended = [h.length == len(h.tokens) + 1 for h in hyps]
    assert any(ended) and not all(ended)  # both kinds are checked
    log_probs = rescore(m, src[index], mask[index], [h.tokens for h in hyps], BOS, EOS, PAD, ended)
    for h, lp in zip(hyps, log_probs.tolist()):
        assert h.log_prob == pytest.approx(lp, abs=1e-9)
        assert h.score == pytest.approx(lp / length_penalty(h.length, alpha), abs=1e-9)


def test_nbest_is_sorted_distinct_and_within_the_limit():
    m = model(seed=3)
    src, mask = source(seed=3)
    limits = torch.tensor([8, 3, 6, 2])
    found = beam_search(m, src, mask, limits, BOS, EOS, beam_size=6, alpha=0.6, nbest=6)
    for hyps, limit in zip(found, limits.tolist()):
        assert len(hyps) == 6
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 6
        assert all(len(h.tokens) <= limit and h.length <= limit for h in hyps)
        assert all(PAD not in h.tokens and EOS not in h.tokens for h in hyps)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0, -0.5])
def test_a_wide_enough_beam_finds_the_best_outputs(alpha):
    """With a beam as wide as every possible prefix, beam search is exhaustive: its
    n-best must be the true n best of all outputs up to the limit, scored by the model.
    A search that stopped when its top beam first ended would miss longer winners
    (alpha > 0 favours them)."""
    vocab, limit = 5, 4  # words: every id but padding and </s>, so 3 of them
    m = model(vocab=vocab, seed=4, N=1)
    src, mask = source(vocab=vocab, lengths=(5,), seed=4)
    words = [w for w in range(vocab) if w not in (PAD, EOS)]
    outputs = [(list(p), True) for n in range(limit) for p in itertools.product(words, repeat=n)]
    outputs += [(list(p), False) for p in itertools.product(words, repeat=limit)]  # cut at the limit
    log_probs = rescore(
        m, src.expand(len(outputs), -1), mask.expand(len(outputs), -1, -1),
        [o for o, _ in outputs], BOS, EOS, PAD, [e for _, e in outputs],
    )
    exact = sorted(
        ((lp / length_penalty(len(o) + e, alpha), o) for (o, e), lp in zip(outputs, log_probs.tolist())),
        key=lambda x: -x[0],
    )
    found = beam_search(m, src, mask, limit, BOS, EOS, beam_size=len(words) ** (limit - 1), alpha=alpha, nbest=5)[0]
    assert [h.tokens for h in found] == [o for _, o in exact[:5]]
    assert [h.score for h in found] == pytest.approx([s for s, _ in exact[:5]], abs=1e-9)


@pytest.mark.parametrize("patience", [0.4, 1.0, 2.0])
def test_a_patient_search_decodes_each_sentence_as_alone_cached_or_not(patience):
    """Sentences stop by the patience rule at different steps, and leave the batch: each
    gets what it gets decoded alone, with the cache or without. The rule is not the full
    search's: on this model it decodes a different number of rows (hypothesis-steps).
    Both follow the same beams, and the full search stops only where nothing better can
    come, so the patient search's k-th best is never better than the full search's."""
    m = model(seed=5)
    with torch.no_grad():
        m.generator.proj.bias[EOS] += 1.5  # sentences end before their limit, some early, some late
    src, mask = source(seed=5, lengths=(7, 4, 6, 2, 9, 5))
    limits = torch.tensor([12, 8, 11, 5, 14, 9])
    decode, rows = m.decode, []
    m.decode = lambda *args: (rows.append(args[2].size(0)), decode(*args))[1]
    search = functools.partial(beam_search, m, beam_size=5, start_symbol=BOS, end_symbol=EOS, alpha=1.0, nbest=2)
    full = search(src=src, src_mask=mask, max_len=limits)
    full_rows = sum(rows)
    together = search(src=src, src_mask=mask, max_len=limits, patience=patience)
    assert sum(rows) - full_rows != full_rows
    uncached = search(src=src, src_mask=mask, max_len=limits, patience=patience, use_cache=False)
    for i, (a, b) in enumerate(zip(together, uncached)):
        alone = search(src=src[i : i + 1], src_mask=mask[i : i + 1], max_len=limits[i : i + 1], patience=patience)[0]
        assert len(a) == 2 and [h.tokens for h in a] == [h.tokens for h in b] == [h.tokens for h in alone]
        assert [h.score for h in a] == pytest.approx([h.score for h in alone], abs=1e-9)
        assert all(x.score >= y.score - 1e-9 for x, y in zip(full[i], a))


def test_a_patient_search_collects_at_least_its_n_best():
    """nbest must fit in the round(beam_size · patience) hypotheses a patient search keeps."""
    from transformer.config import load_config

    m = model(seed=6)
    src, mask = source(seed=6)
    with pytest.raises(ConfigError, match=r"beam size x patience \(5 x 0.4, rounded: 2\)"):
        beam_search(m, src, mask, 6, BOS, EOS, beam_size=5, nbest=3, patience=0.4)
    assert len(beam_search(m, src, mask, 6, BOS, EOS, beam_size=5, nbest=2, patience=0.4)[0]) == 2
    with pytest.raises(ConfigError, match="'decode.nbest'.*patience"):
        load_config(None, ["decode.nbest=3", "decode.patience=0.4"])
    assert load_config(None, ["decode.beam_size=1", "decode.patience=0.1"]).decode.patience == 0.1  # greedy: none


def test_beam_search_checks_nbest():
    m = model()
    src, mask = source()
    with pytest.raises(ValueError, match="nbest"):
        beam_search(m, src, mask, 5, BOS, EOS, beam_size=2, nbest=3)


# --------------------------------------------------------------------------- Translator


class Letters:
    """A tokenizer for tests: the letters a-h are ids 3-10, and </s> ends each side."""

    kind = "letters"
    pad_id, bos_id, eos_id = PAD, BOS, EOS
    src_vocab_size = tgt_vocab_size = 11
    shared_vocab = True

    def encode_src(self, text):
        return [ord(c) - ord("a") + 3 for c in text if c.strip()] + [EOS]

    def encode_tgt(self, text):
        return [BOS] + self.encode_src(text)

    def decode_tgt(self, ids):
        return "".join(chr(i - 3 + ord("a")) if i >= 3 else f"<{i}>" for i in ids)

    def pieces(self, ids, side):
        return [self.decode_tgt([i]) for i in ids]

    def state_dict(self):
        return {"kind": self.kind}


def translator(**cfg):
    m = model(seed=5)
    m.src_embed[1].pe = m.src_embed[1].pe[:, :12]  # a short positional table, to test cutting
    return Translator(m, Letters(), DecodeConfig(**cfg), torch.device("cpu"))


SENTENCES = ["abcdefg", "", "ab", "hgfedcbaabc", "c", "abcd", "", "dddd"]


@pytest.mark.parametrize("beam_size", [1, 4])
def test_translator_keeps_input_order_and_empty_lines(beam_size):
    """Batches are sorted by length (and small here), yet output i is sentence i's."""
    t = translator(beam_size=beam_size, batch_size=2, batch_tokens=12)
    outputs = t.translate(SENTENCES)
    alone = [t.translate([s])[0] for s in SENTENCES]
    assert outputs == alone
    assert outputs[1] == outputs[6] == ""


@pytest.mark.parametrize("beam_size", [1, 4])
def test_decoding_batches_in_parallel_changes_nothing(beam_size):
    """Batches decoded by three workers at once, each on one thread, give what one
    batch after another gives (tokens, lengths and scores); the thread setting is
    restored afterwards."""
    threads = torch.get_num_threads()
    sentences = SENTENCES * 3
    found = {}
    for workers in (1, 3):
        t = translator(beam_size=beam_size, length_penalty=0.6, batch_size=2, batch_tokens=12, workers=workers)
        assert t.workers == workers
        found[workers] = t.search(t.encode(sentences), nbest=1)
        assert torch.get_num_threads() == threads
    for one, par in zip(found[1], found[3]):
        assert [(h.tokens, h.length) for h in one] == [(h.tokens, h.length) for h in par]
        assert [h.score for h in par] == pytest.approx([h.score for h in one], rel=1e-12, nan_ok=True)


def test_translator_workers_default():
    """Two workers on a CPU with two threads or more, else one."""
    threads = torch.get_num_threads()
    try:
        for n, expected in ((1, 1), (2, 2), (4, 2)):
            torch.set_num_threads(n)
            assert translator().workers == expected
    finally:
        torch.set_num_threads(threads)


def test_translator_batches_respect_both_budgets():
    t = translator(batch_size=3, batch_tokens=10)
    sources = t.encode(SENTENCES)
    batches = list(t._batches(sources))
    assert sorted(i for b in batches for i in b) == [i for i, s in enumerate(sources) if s]
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(len(sources[i]) for i in b) <= 10


@pytest.mark.parametrize("beam_size, hypotheses, most", [(1, 4, 5), (4, 8, 2), (4, 3, 1), (4, None, 5)])
def test_beam_batches_respect_the_hypotheses_budget(beam_size, hypotheses, most):
    """With beam search a batch holds at most batch_hypotheses // beam_size sentences
    (one at least); greedy decoding ignores the budget, and on the CPU its default
    (640) leaves small batches as batch_size makes them."""
    t = translator(beam_size=beam_size, batch_size=5, batch_hypotheses=hypotheses)
    sources = t.encode(SENTENCES * 2)
    batches = list(t._batches(sources))
    assert sorted(i for b in batches for i in b) == [i for i, s in enumerate(sources) if s]
    assert max(len(b) for b in batches) == most


def test_the_hypotheses_budget_defaults_to_640_on_a_cpu_only():
    """Beam 4: 160 sentences a batch on a CPU; batch_size alone on a GPU (only the
    batching is asked for, so no GPU is needed)."""
    t = translator(beam_size=4, batch_size=300)
    assert t._batch_sentences() == 160
    t.device = torch.device("cuda:1")
    assert t._batch_sentences() == 300
    t.cfg = DecodeConfig(beam_size=4, batch_size=300, batch_hypotheses=100)
    assert t._batch_sentences() == 25


def test_beam_search_outputs_do_not_depend_on_the_hypotheses_budget():
    """Smaller beam batches change where sentences are decoded, not what is found."""
    found, batches = [], []
    for hypotheses in (None, 4):
        t = translator(beam_size=4, length_penalty=0.6, batch_hypotheses=hypotheses)
        sources = t.encode(SENTENCES * 2)
        batches.append(len(list(t._batches(sources))))
        found.append(t.search(sources, nbest=2))
    assert batches == [1, 12]  # all 12 non-empty sentences at once, then one at a time
    for one, other in zip(*found):
        assert [(h.tokens, h.length) for h in one] == [(h.tokens, h.length) for h in other]
        assert [h.score for h in other] == pytest.approx([h.score for h in one], rel=1e-5, nan_ok=True)


def test_translator_cuts_over_long_lines_with_a_warning(caplog):
    t = translator(beam_size=3)
    with caplog.at_level(logging.WARNING):
        out = t.translate(["ab", "abcdefghabcdefgh"], first_line=7)
    assert len(out) == 2
    assert "line 8" in caplog.text and "limit of 12" in caplog.text


def test_greedy_translations_are_scored_like_beam_size_one():
    """The Translator scores greedy outputs by rescoring them; with alpha 0 beam size 1
    finds the same outputs, and its log-probabilities and lengths give the same scores."""
    alpha = 0.7
    t = translator(beam_size=1, length_penalty=alpha, max_len_a=1.0, max_len_b=2)
    greedy = t.search(t.encode(SENTENCES), nbest=1)
    for sentence, hyps in zip(SENTENCES, greedy):
        if not sentence:
            continue
        src = torch.tensor([t.encode([sentence])[0]])
        limit = t._limits([src.size(1)])
        [beam] = beam_search(t.model, src, padding_mask(src, PAD), limit, BOS, EOS, beam_size=1)[0:1]
        assert hyps[0].tokens == beam[0].tokens and hyps[0].length == beam[0].length
        assert hyps[0].score == pytest.approx(beam[0].log_prob / length_penalty(beam[0].length, alpha), abs=1e-9)


def test_translator_nbest():
    out = translator(beam_size=4, length_penalty=1.0).translate_nbest(SENTENCES, nbest=3)
    for sentence, hyps in zip(SENTENCES, out):
        if sentence:
            assert len(hyps) == 3 and len({text for text, _ in hyps}) == 3
            assert [s for _, s in hyps] == sorted((s for _, s in hyps), reverse=True)
        else:
            assert [text for text, _ in hyps] == [""]
    with pytest.raises(ValueError, match="nbest"):
        translator(beam_size=2).translate_nbest(["ab"], nbest=3)


def test_translator_decodes_in_another_dtype_on_a_copy():
    """decode.dtype bf16 decodes with a bf16 copy: the caller's model stays float64, and
    the bf16 beam scores are that copy's own rescoring of its outputs."""
    m = model(seed=5)
    t = Translator(m, Letters(), DecodeConfig(beam_size=3, length_penalty=0.0, dtype="bf16"), torch.device("cpu"))
    assert next(m.parameters()).dtype == torch.float64
    assert {p.dtype for p in t.model.parameters()} == {torch.bfloat16}
    sentences = [s for s in SENTENCES if s]
    found = t.search(t.encode(sentences), nbest=1)
    src = [t.encode([s])[0] for s in sentences]
    for ids, hyps in zip(src, found):
        x = torch.tensor([ids])
        h = hyps[0]
        [lp] = rescore(t.model, x, padding_mask(x, PAD), [h.tokens], BOS, EOS, PAD, [h.length > len(h.tokens)]).tolist()
        assert h.log_prob == pytest.approx(lp, abs=0.05 * (1 + abs(lp)))  # bf16: about 3 significant digits
    assert Translator(m, Letters(), DecodeConfig(dtype="fp32"), torch.device("cpu")).model is not m
    assert Translator(m, Letters(), DecodeConfig(), torch.device("cpu")).model is m
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Translator(m, Letters(), DecodeConfig(dtype="fp16"), torch.device("cpu"))


# --------------------------------------------------------------------------- GreedyStream

STREAMED = ["abcdefg", "", "ab", "hgfedcbaabc", "c", "abcd", "", "dddd", "hhhhhhhhhhhhhhhh", "abab", "gfe", "bbbbbbb"]


def streaming_translator():
    """Greedy, with limits that differ by length, and an end symbol made likely enough
    that some sentences end with it and others at their limit."""
    m = model(seed=0)
    with torch.no_grad():
        m.generator.proj.bias[EOS] += 1.0
    return Translator(m, Letters(), DecodeConfig(beam_size=1, max_len_a=1.0, max_len_b=3), torch.device("cpu"))


def run_stream(stream, sources, joins):
    """Add sources[i] before step joins[i] (steps counted from 0); step until all end."""
    found, step = {}, 0
    while len(found) < len(sources):
        for i, at in enumerate(joins):
            if at == step:
                stream.add(i, sources[i])
        for key, hyps in stream.step():
            assert key not in found
            found[key] = hyps
        step += 1
        assert step < 200
    assert len(stream) == 0
    return [found[i] for i in range(len(sources))]


@pytest.mark.parametrize("schedule", ["together", "one per step", "random"])
def test_a_stream_gives_each_sentence_what_greedy_search_gives_it(schedule):
    """Sentences joining the rows being decoded at other steps (so that rows are at
    different positions, with keys of different lengths and sources of different
    widths) and leaving as they end get the tokens and lengths of a greedy search."""
    t = streaming_translator()
    sources = t.encode(STREAMED)
    expected = t.search(sources, scores=False)
    ends = [h[0].length > len(h[0].tokens) for h in expected]
    assert 0 < sum(ends) < len(ends)  # both ways of ending are tested
    joins = {
        "together": [0] * len(sources),
        "one per step": list(range(len(sources))),
        "random": torch.randint(0, 15, (len(sources),), generator=torch.Generator().manual_seed(3)).tolist(),
    }[schedule]
    found = run_stream(t.stream(), sources, joins)
    assert [(h[0].tokens, h[0].length) for h in found] == [(h[0].tokens, h[0].length) for h in expected]
    assert all(h[0].score != h[0].score for h in found)  # NaN: not scored, as search(scores=False)


def test_a_stream_decodes_in_the_translators_dtype_and_empties():
    t = streaming_translator()
    t32 = Translator(t.model.float(), t.tokenizer, t.cfg, t.device)
    sources = t32.encode(STREAMED)
    found = run_stream(t32.stream(), sources, [i % 3 for i in range(len(sources))])
    assert [h[0].tokens for h in found] == [h[0].tokens for h in t32.search(sources, scores=False)]
    stream = t32.stream()
    assert stream.step() == [] and len(stream) == 0 and stream.decoding == 0


# --------------------------------------------------------------------------- packed weights

needs_packing = pytest.mark.skipif(not can_pack(nn.Linear(2, 2)), reason="this torch has no oneDNN linear kernels")


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_computes_what_the_linear_computes(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(32, 48, bias=bias).to(dtype)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for shape in [(1, 32), (7, 32), (3, 5, 32), (300, 32)]:
            x = torch.randn(shape, dtype=dtype)
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(packed(x), linear(x), rtol=tolerance, atol=tolerance)
    assert packed.weight is linear.weight and packed.bias is linear.bias
    # A copy packs its own copy of the weight; a cast packs the cast weight.
    copied = copy.deepcopy(packed)
    assert copied.weight is not linear.weight and torch.equal(copied.weight, linear.weight)
    as_double = copy.deepcopy(packed).double()  # a dtype oneDNN does not take: nn.Linear's product
    with torch.inference_mode():
        x = torch.randn(4, 32, dtype=dtype)
        torch.testing.assert_close(copied(x), packed(x))
        torch.testing.assert_close(as_double(x.double()), linear.double()(x.double()))


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_feed_forward_computes_what_the_feed_forward_computes(dtype):
    """W₁'s product with the ReLU in it equals the article's module in eval mode; while
    training with dropout it is the article's module, random numbers included."""
    torch.manual_seed(0)
    ff = PositionwiseFeedForward(32, 96, dropout=0.5).to(dtype)
    wrapper = nn.Sequential(ff)
    packed = packed_copy(wrapper)[0]
    assert type(packed) is PackedFeedForward and isinstance(packed.w_1, PackedLinear)
    assert dict(packed.named_parameters()).keys() == dict(ff.named_parameters()).keys()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    x = torch.randn(3, 7, 32, dtype=dtype)
    with torch.inference_mode():
        ff.eval(), packed.eval()
        out = packed(x)
        torch.testing.assert_close(out, ff(x), rtol=tolerance, atol=tolerance)
        assert not torch.equal(out, ff.w_2(ff.w_1(x)))  # the ReLU is there
        # A dtype oneDNN does not take: the module as it is.
        as_double = copy.deepcopy(packed).double()
        assert as_double.w_1.packed is None
        torch.testing.assert_close(as_double(x.double()), copy.deepcopy(ff).double()(x.double()))
    ff.train(), packed.train()
    torch.manual_seed(1)
    a = ff(x)
    torch.manual_seed(1)
    torch.testing.assert_close(packed(x), a, rtol=tolerance, atol=tolerance)


@needs_packing
@pytest.mark.parametrize("beam_size", [1, 4])
def test_a_packed_translator_decodes_what_the_plain_one_decodes(beam_size):
    """The default Translator decodes a packed copy (in float32); the outputs, scores
    included, are those of the model as it is, which is left unpacked."""
    m = model(seed=5).float()
    cfg = DecodeConfig(beam_size=beam_size)
    packed = Translator(m, Letters(), cfg, torch.device("cpu"))
    plain = Translator(m, Letters(), cfg, torch.device("cpu"), packed=False)
    assert any(isinstance(x, PackedLinear) for x in packed.model.modules())
    assert any(isinstance(x, PackedFeedForward) for x in packed.model.modules())
    assert not any(isinstance(x, (PackedLinear, PackedFeedForward)) for x in m.modules()) and plain.model is m
    sources = packed.encode(SENTENCES)
    a, b = packed.search(sources), plain.search(sources)
    assert [[h.tokens for h in hs] for hs in a] == [[h.tokens for h in hs] for hs in b]
    assert [hs[0].score for hs in a if hs[0].tokens] == pytest.approx(
        [hs[0].score for hs in b if hs[0].tokens], rel=1e-4)
    found = run_stream(packed.stream(), sources, [i % 2 for i in range(len(sources))])
    greedy = Translator(m, Letters(), DecodeConfig(beam_size=1), torch.device("cpu"), packed=False)
    assert [h[0].tokens for h in found] == [hs[0].tokens for hs in greedy.search(sources, scores=False)]
    # Tied weights stay tied, and the parameters are the model's own, by name.
    assert dict(packed.model.named_parameters()).keys() == dict(m.named_parameters()).keys()
    # A packed model cast to another dtype (a Translator with decode.dtype) packs anew.
    bf16 = Translator(packed.model, Letters(), DecodeConfig(beam_size=beam_size, dtype="bf16"), torch.device("cpu"))
    proj = bf16.model.generator.proj
    assert isinstance(proj, PackedLinear) and proj.weight.dtype == torch.bfloat16 and proj.packed is not None
    assert len(bf16.search(sources)) == len(sources)
