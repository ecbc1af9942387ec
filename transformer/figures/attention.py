"""Attention maps: where each token looked, drawn from one real forward pass.

``attention_maps`` runs the model over one sentence pair (teacher-forced, as the
article draws them) and asks each attention module for its weights
(``MultiHeadedAttention.weights``); the modules themselves keep none.
``plot_attention_grid`` draws them, one heat map per layer and head, for
``translate.py --plot-attention`` and ``python -m transformer.figures`` alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from transformer.data.batching import padding_mask, target_mask
from transformer.data.tokenizers import Tokenizer
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIALS, Vocab
from transformer.figures.drawing import FigureError, pyplot, save
from transformer.model.architecture import EncoderDecoder, make_model
from transformer.model.attention import MultiHeadedAttention

# Attention kind -> (title, side of the query tokens, side of the key tokens).
KINDS = {
    "encoder": ("encoder self-attention", "src", "src"),
    "decoder_self": ("decoder self-attention", "tgt", "tgt"),
    "encoder_decoder": ("encoder-decoder attention", "tgt", "src"),
}
SIDES = {"src": "source", "tgt": "target"}

# A Multi30k-style sentence (the training set has "Zwei Männer stehen am Strand und
# schauen in die Ferne."), and an English side for the untrained model's decoder.
DEFAULT_SENTENCE = "Zwei Männer stehen am Strand."
UNTRAINED_TARGET = "Two men are standing on the beach."

# The untrained model: small enough to build and run in a fraction of a second.
TINY = {"N": 2, "d_model": 32, "d_ff": 64, "h": 4}


@torch.no_grad()
def attention_maps(model: EncoderDecoder, src_ids: Sequence[int], tgt_ids: Sequence[int], pad: int) -> dict[str, Tensor]:
    """The attention weights of every layer and head for one sentence pair.

    One teacher-forced pass over the pair: ``tgt_ids`` is what the decoder reads
    (``<s>`` and then the translation). Each attention module's inputs are caught on
    the way (a forward pre-hook, removed afterwards) and its weights computed from them.

    Returns:
        {"encoder": (N, h, S, S), "decoder_self": (N, h, T, T),
        "encoder_decoder": (N, h, T, S)}, float32 on the CPU; each row sums to 1.
    """
    model.eval()
    device = next(model.parameters()).device
    src = torch.tensor([list(src_ids)], dtype=torch.long, device=device)
    tgt = torch.tensor([list(tgt_ids)], dtype=torch.long, device=device)
    inputs: dict[MultiHeadedAttention, tuple] = {}

    def catch(module, args, kwargs):  # called as module(query, key, value, mask, cache=...)
        inputs[module] = (args[0], args[1], args[3] if len(args) > 3 else kwargs.get("mask"))

    modules = [m for m in model.modules() if isinstance(m, MultiHeadedAttention)]
    hooks = [m.register_forward_pre_hook(catch, with_kwargs=True) for m in modules]
    try:
        model(src, tgt, padding_mask(src, pad), target_mask(tgt, pad))
    finally:
        for hook in hooks:
            hook.remove()
    maps = {
        "encoder": [layer.self_attn for layer in model.encoder.layers],
        "decoder_self": [layer.self_attn for layer in model.decoder.layers],
        "encoder_decoder": [layer.src_attn for layer in model.decoder.layers],
    }
    return {kind: torch.stack([m.weights(*inputs[m])[0] for m in ms]).float().cpu() for kind, ms in maps.items()}


def plot_attention_grid(
    weights: Tensor,
    layers: Sequence[int],
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    path: Path,
    axis_names: tuple[str, str] = ("keys", "queries"),
) -> Path:
    """Draw the heads of the chosen layers as a grid of heat maps, tokens on both axes.

    Args:
        weights: every layer's attention weights, as ``attention_maps`` returns them.
        layers: 1-based numbers of the layers to draw, one row each.
        axis_names: what the columns (keys) and the rows (queries) of each map are.

    Shape:
        weights (N, h, T_q, T_k); rows has T_q labels, cols T_k.
    """
    plt = pyplot()
    heads = weights.size(1)
    cell = max(2.3, 0.22 * max(len(rows), len(cols)))
    fig, axes = plt.subplots(
        len(layers), heads, figsize=(cell * heads, cell * len(layers) + 0.6), squeeze=False, sharex=True, sharey=True
    )
    # Shared axes: the tokens are written once, along the left column and the bottom row.
    axes[0][0].set_xticks(range(len(cols)), cols)
    axes[0][0].set_yticks(range(len(rows)), rows)
    for i, layer in enumerate(layers):
        for j in range(heads):
            ax = axes[i][j]
            ax.imshow(weights[layer - 1, j].numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"layer {layer}, head {j + 1}", fontsize=9)
            ax.tick_params(axis="x", labelrotation=90, labelsize=7)
            ax.tick_params(axis="y", labelsize=7)
            ax.label_outer()
    fig.suptitle(title)
    fig.supxlabel(axis_names[0], fontsize=9)
    fig.supylabel(axis_names[1], fontsize=9)
    return save(fig, path)


def chosen_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """The 1-based layer numbers to draw (None: all of them), checked against the model."""
    if layers is None:
        return list(range(1, n_layers + 1))
    if not layers or any(not 1 <= n <= n_layers for n in layers):
        raise FigureError(f"--layers {' '.join(map(str, layers))}: the model has layers 1 to {n_layers}")
    return list(layers)


@dataclass(frozen=True)
class AttentionInput:
    """One sentence pair as a model sees it, with the token labels for the axes."""

    model: EncoderDecoder
    src_ids: list[int]
    tgt_ids: list[int]  # <s> and then the translation, as the decoder reads it
    src_labels: list[str]
    tgt_labels: list[str]
    pad: int
    description: str  # for the titles: "trained: best.pt", "untrained tiny model, random weights", or ""


def plot_attention_figures(
    source: AttentionInput, layers: Sequence[int] | None, out: Path, kinds: Sequence[str] = tuple(KINDS),
    prefix: str = "attention_",
) -> list[Path]:
    """Write ``<prefix><kind>.png`` for each kind of ``KINDS``: encoder self-attention,
    decoder self-attention and encoder-decoder attention.

    Args:
        layers: 1-based layers to draw (None: all).
        kinds: which of them to draw.
    """
    layers = chosen_layers(layers, len(source.model.encoder.layers))
    maps = attention_maps(source.model, source.src_ids, source.tgt_ids, source.pad)
    labels = {"src": source.src_labels, "tgt": source.tgt_labels}
    paths = []
    for kind in kinds:
        name, row_side, col_side = KINDS[kind]
        title = f"{name} ({source.description})" if source.description else name
        axis_names = (f"{SIDES[col_side]} tokens attended to (keys)", f"{SIDES[row_side]} tokens attending (queries)")
        path = out / f"{prefix}{kind}.png"
        paths.append(plot_attention_grid(maps[kind], layers, labels[row_side], labels[col_side], title, path, axis_names))
    return paths


def plot_sentence(
    model: EncoderDecoder, tokenizer: Tokenizer, src_ids: Sequence[int], hyp_ids: Sequence[int], out_dir: Path, stem: str
) -> list[Path]:
    """Write ``<stem>-<kind>.png`` for each attention kind of one translated sentence."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tgt_ids = [tokenizer.bos_id, *hyp_ids]
    source = AttentionInput(model, list(src_ids), tgt_ids, tokenizer.pieces(src_ids, "src"),
                            tokenizer.pieces(tgt_ids, "tgt"), tokenizer.pad_id, "")
    return plot_attention_figures(source, None, out_dir, prefix=f"{stem}-")


def _words(text: str) -> list[str]:
    """Words and punctuation marks: enough for the untrained model's toy vocabulary."""
    return re.findall(r"\w+|[^\w\s]", text)


def untrained_input(sentence: str, target: str | None, seed: int = 0) -> AttentionInput:
    """An untrained tiny model whose word vocabularies are the words of the sentence pair."""
    src_words, tgt_words = _words(sentence), _words(target if target is not None else UNTRAINED_TARGET)
    if not src_words:
        raise FigureError("--sentence is empty")
    src_vocab = Vocab(SPECIALS + list(dict.fromkeys(src_words)))
    tgt_vocab = Vocab(SPECIALS + list(dict.fromkeys(tgt_words)))
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = make_model(len(src_vocab), len(tgt_vocab), dropout=0.0, **TINY)
    src_ids = src_vocab.encode(src_words) + [EOS_ID]
    tgt_ids = [BOS_ID] + tgt_vocab.encode(tgt_words)
    return AttentionInput(
        model, src_ids, tgt_ids, src_vocab.decode(src_ids), tgt_vocab.decode(tgt_ids), PAD_ID,
        "untrained tiny model, random weights",
    )


def checkpoint_input(translator, sentence: str, target: str | None, name: str) -> AttentionInput:
    """The sentence and, unless ``target`` is given, the checkpoint's own translation of it."""
    tok = translator.tokenizer
    (src_ids,) = translator.encode([sentence])
    if not src_ids:
        raise FigureError("--sentence is empty")
    if target is None:
        (hyp,) = translator.translate_ids([src_ids])
        tgt_ids = [tok.bos_id, *hyp]
    else:
        tgt_ids = tok.encode_tgt(target)
        if tok.eos_id is not None and tgt_ids[-1] == tok.eos_id:
            tgt_ids = tgt_ids[:-1]  # the decoder reads <s> and the words, not </s>
    return AttentionInput(
        translator.model, src_ids, tgt_ids, tok.pieces(src_ids, "src"), tok.pieces(tgt_ids, "tgt"), tok.pad_id,
        f"trained: {name}",
    )
