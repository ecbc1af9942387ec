"""Pictures of a trained model: the article's attention maps, from one sentence pair.

matplotlib is an optional dependency (``pip install -e ".[plot]"``); it is imported
only when a picture is drawn.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from transformer.attention import MultiHeadedAttention
from transformer.batching import padding_mask, target_mask
from transformer.model import EncoderDecoder
from transformer.tokenize import Tokenizer

# Attention kind -> (title, side of the query tokens, side of the key tokens).
KINDS = {
    "encoder": ("encoder self-attention", "src", "src"),
    "decoder_self": ("decoder self-attention", "tgt", "tgt"),
    "encoder_decoder": ("encoder-decoder attention", "tgt", "src"),
}


def require_matplotlib() -> None:
    """Fail early, with the command that fixes it, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError('attention pictures need matplotlib: pip install -e ".[plot]"') from None


@contextmanager
def record_attention(model: EncoderDecoder) -> Iterator[None]:
    """Make every attention module keep its last weights in ``.attn`` while inside."""
    modules = [m for m in model.modules() if isinstance(m, MultiHeadedAttention)]
    for m in modules:
        m.keep_attention = True
    try:
        yield
    finally:
        for m in modules:
            m.keep_attention, m.attn = False, None


@torch.no_grad()
def attention_maps(model: EncoderDecoder, src_ids: Sequence[int], tgt_ids: Sequence[int], pad: int) -> dict[str, Tensor]:
    """The attention weights of every layer and head for one sentence pair.

    One teacher-forced pass over the pair, as the article draws them: ``tgt_ids`` is
    what the decoder reads (``<s>`` and then the translation).

    Returns:
        {"encoder": (N, h, S, S), "decoder_self": (N, h, T, T),
        "encoder_decoder": (N, h, T, S)}, float32 on the CPU; each row sums to 1.
    """
    model.eval()
    device = next(model.parameters()).device
    src = torch.tensor([list(src_ids)], dtype=torch.long, device=device)
    tgt = torch.tensor([list(tgt_ids)], dtype=torch.long, device=device)
    with record_attention(model):
        model(src, tgt, padding_mask(src, pad), target_mask(tgt, pad))
        maps = {
            "encoder": [layer.self_attn.attn for layer in model.encoder.layers],
            "decoder_self": [layer.self_attn.attn for layer in model.decoder.layers],
            "encoder_decoder": [layer.src_attn.attn for layer in model.decoder.layers],
        }
    return {kind: torch.stack([w[0] for w in ws]).float().cpu() for kind, ws in maps.items()}


def plot_attention(weights: Tensor, rows: Sequence[str], cols: Sequence[str], title: str, path: Path) -> None:
    """Draw (N, h, T_q, T_k) weights as an N × h grid of heat maps, tokens on both axes."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    layers, heads = weights.shape[:2]
    cell = max(2.5, 0.22 * max(len(rows), len(cols)))
    fig, axes = plt.subplots(layers, heads, figsize=(cell * heads, cell * layers + 0.6), squeeze=False)
    for i in range(layers):
        for j in range(heads):
            ax = axes[i][j]
            ax.imshow(weights[i, j].numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
            ax.set_yticks(range(len(rows)), rows, fontsize=7)
            ax.set_title(f"layer {i + 1}, head {j + 1}", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sentence(
    model: EncoderDecoder, tokenizer: Tokenizer, src_ids: Sequence[int], hyp_ids: Sequence[int], out_dir: Path, stem: str
) -> list[Path]:
    """Write ``<stem>-<kind>.png`` for each attention kind of one translated sentence."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tgt_ids = [tokenizer.bos_id, *hyp_ids]
    labels = {"src": tokenizer.pieces(src_ids, "src"), "tgt": tokenizer.pieces(tgt_ids, "tgt")}
    paths = []
    for kind, weights in attention_maps(model, src_ids, tgt_ids, tokenizer.pad_id).items():
        title, row_side, col_side = KINDS[kind]
        path = out_dir / f"{stem}-{kind}.png"
        plot_attention(weights, labels[row_side], labels[col_side], title, path)
        paths.append(path)
    return paths
