"""The article's figures, redrawn from this package's own code (``python -m transformer.figures``).

Every picture is computed by the functions the model trains and decodes with, so a
figure is also a check that the code does what the article says: the causal mask is
``subsequent_mask``, the encodings ``sinusoid_table``, the schedule ``rate``, the
targets ``LabelSmoothing``, the attention maps those of a real forward pass.

With ``--checkpoint`` the attention maps come from that model, its tokenizer and its
translation of ``--sentence``, and the training curve from the ``metrics.jsonl`` of its
run directory; without one, from an untrained tiny model (random weights, said so in
the titles), so the command runs anywhere, offline, in seconds.

matplotlib is an optional dependency (``pip install -e ".[plot]"``); it is imported
only when a picture is drawn.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transformer.batching import subsequent_mask
from transformer.loss import LabelSmoothing
from transformer.model import EncoderDecoder, make_model, sinusoid_table
from transformer.plots import KINDS, attention_maps, require_matplotlib
from transformer.schedule import rate
from transformer.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIALS, Vocab

log = logging.getLogger(__name__)

# A Multi30k-style sentence (the training set has "Zwei Männer stehen am Strand und
# schauen in die Ferne."), and an English side for the untrained model's decoder.
DEFAULT_SENTENCE = "Zwei Männer stehen am Strand."
UNTRAINED_TARGET = "Two men are standing on the beach."

# File stem -> what the picture shows (the README's and docs/guide.md's table).
FIGURES = {
    "subsequent_mask": "the decoder's causal mask: which positions each target position may attend to",
    "attention_scaling": "q·k before and after dividing by √d_k, for several d_k (unit-variance q, k)",
    "positional_encoding": "four dimensions of the sinusoidal encoding over positions, wavelengths 2π to 200π",
    "positional_encoding_heatmap": "the whole positional-encoding table, dimension by position",
    "noam_schedule": "the learning rate over optimizer steps for several (d_model, warmup) pairs",
    "label_smoothing": "the smoothed target distribution of a few tokens (padding gets nothing)",
    "label_smoothing_penalty": "the loss against the model's probability of the correct token, per ε",
    "attention_encoder": "encoder self-attention of one sentence, every head of the chosen layers",
    "attention_decoder_self": "decoder self-attention of its translation (causal: nothing above the diagonal)",
    "attention_encoder_decoder": "encoder-decoder attention: which source tokens each target token reads",
    "training_curve": "training and validation loss, validation BLEU/chrF over steps, from metrics.jsonl",
}

# (d_model, factor, warmup) of the schedules drawn in noam_schedule.png: the paper's base
# model, a longer warmup, and a narrower model.
SCHEDULES = ((512, 1.0, 4000), (512, 1.0, 8000), (256, 1.0, 4000))

# The untrained model: small enough to build and run in a fraction of a second.
TINY = {"N": 2, "d_model": 32, "d_ff": 64, "h": 4}


class FigureError(ValueError):
    """An input the figures cannot use (missing log, bad option); the message names it."""


@dataclass(frozen=True)
class FigureOptions:
    """What ``make_figures`` draws, and from what.

    Attributes:
        out: folder the PNGs go to (created if needed).
        checkpoint: a trained model; None: an untrained tiny model.
        sentence: the source sentence of the attention maps.
        target: what the decoder reads for the attention maps (teacher-forced); None:
            the checkpoint's own translation of ``sentence``, or ``UNTRAINED_TARGET``.
        layers: 1-based layers whose heads are drawn; None: every layer.
        log: a run's metrics.jsonl; None: the one beside the checkpoint, if any.
        device: where the checkpoint's model runs ("auto", "cpu", "cuda", ...).
        seed: seeds the untrained model and the q·k samples.
        only: names of ``FIGURES`` to draw; None: all of them.
    """

    out: Path = Path("figures")
    checkpoint: Path | None = None
    sentence: str = DEFAULT_SENTENCE
    target: str | None = None
    layers: tuple[int, ...] | None = None
    log: Path | None = None
    device: str = "auto"
    seed: int = 0
    only: tuple[str, ...] | None = None


@dataclass(frozen=True)
class FigureReport:
    """What ``make_figures`` did: the files written, and the figures skipped with why."""

    written: tuple[Path, ...]
    skipped: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AttentionInput:
    """One sentence pair as a model sees it, with the token labels for the axes."""

    model: EncoderDecoder
    src_ids: list[int]
    tgt_ids: list[int]  # <s> and then the translation, as the decoder reads it
    src_labels: list[str]
    tgt_labels: list[str]
    pad: int
    description: str  # for the titles: "trained: best.pt" or "untrained tiny model, random weights"


# --------------------------------------------------------------------------- drawing helpers


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


# --------------------------------------------------------------------------- masks and attention


def plot_subsequent_mask(path: Path, size: int = 20) -> Path:
    """``subsequent_mask(size)``: row i (a query position) may attend to the dark columns 0..i."""
    plt = _pyplot()
    mask = subsequent_mask(size)[0]  # (size, size), True = may attend
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.imshow(mask.numpy(), cmap="Greys", vmin=0, vmax=1)
    ticks = range(0, size, max(1, size // 5))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("key position (attended to)")
    ax.set_ylabel("query position (attending)")
    ax.set_title(f"subsequent_mask({size})\ndark: may attend; light: masked (the future)", fontsize=10)
    return _save(fig, path)


def dot_products(d_k: int, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """q·k and q·k/√d_k for ``n`` pairs of vectors with independent N(0, 1) components.

    q·k is a sum of d_k products of unit variance, so its variance is d_k; dividing by
    √d_k brings it back to 1 whatever d_k, which keeps the softmax out of its flat tails.

    Shape:
        returns two (n,) float64 tensors.
    """
    q = torch.randn(n, d_k, generator=generator, dtype=torch.float64)
    k = torch.randn(n, d_k, generator=generator, dtype=torch.float64)
    dots = (q * k).sum(-1)
    return dots, dots / math.sqrt(d_k)


def plot_attention_scaling(path: Path, d_ks: Sequence[int] = (4, 64, 512), n: int = 10000, seed: int = 0) -> Path:
    """Histograms of q·k (top row) and q·k/√d_k (bottom row) for each d_k, with their variances."""
    plt = _pyplot()
    generator = torch.Generator().manual_seed(seed)
    fig, axes = plt.subplots(2, len(d_ks), figsize=(3.4 * len(d_ks), 5.2), squeeze=False)
    for j, d_k in enumerate(d_ks):
        dots, scaled = dot_products(d_k, n, generator)
        for i, (values, name, color) in enumerate(((dots, "q·k", "tab:red"), (scaled, "q·k / √d_k", "tab:blue"))):
            ax = axes[i][j]
            ax.hist(values.numpy(), bins=60, color=color, alpha=0.8)
            ax.set_title(f"{name}, d_k = {d_k}: variance {values.var().item():.2f}", fontsize=9)
            ax.set_xlabel(name)
            ax.set_ylabel("count" if j == 0 else "")
    fig.suptitle(f"Why attention divides by √d_k: {n} random q, k with unit-variance components")
    return _save(fig, path)


def plot_attention_layers(
    weights: Tensor,
    layers: Sequence[int],
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    path: Path,
    axis_names: tuple[str, str] = ("keys", "queries"),
) -> Path:
    """Draw the heads of the chosen layers as a grid of heat maps, tokens on both axes.

    Like ``transformer.plots.plot_attention``, but for a subset of the layers, each
    labelled with its own number.

    Args:
        weights: every layer's attention weights, as ``attention_maps`` returns them.
        layers: 1-based numbers of the layers to draw, one row each.
        axis_names: what the columns (keys) and the rows (queries) of each map are.

    Shape:
        weights (N, h, T_q, T_k); rows has T_q labels, cols T_k.
    """
    plt = _pyplot()
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
    return _save(fig, path)


def chosen_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """The 1-based layer numbers to draw (None: all of them), checked against the model."""
    if layers is None:
        return list(range(1, n_layers + 1))
    if not layers or any(not 1 <= n <= n_layers for n in layers):
        raise FigureError(f"--layers {' '.join(map(str, layers))}: the model has layers 1 to {n_layers}")
    return list(layers)


def plot_attention_figures(
    source: AttentionInput, layers: Sequence[int] | None, out: Path, kinds: Sequence[str] = tuple(KINDS)
) -> list[Path]:
    """Write ``attention_<kind>.png`` for each kind of ``transformer.plots.KINDS``: encoder
    self-attention, decoder self-attention and encoder-decoder attention.

    Args:
        layers: 1-based layers to draw (None: all).
        kinds: which of them to draw.
    """
    layers = chosen_layers(layers, len(source.model.encoder.layers))
    maps = attention_maps(source.model, source.src_ids, source.tgt_ids, source.pad)
    labels = {"src": source.src_labels, "tgt": source.tgt_labels}
    sides = {"src": "source", "tgt": "target"}
    paths = []
    for kind in kinds:
        weights = maps[kind]
        name, row_side, col_side = KINDS[kind]
        title = f"{name} ({source.description})"
        axis_names = (f"{sides[col_side]} tokens attended to (keys)", f"{sides[row_side]} tokens attending (queries)")
        path = out / f"attention_{kind}.png"
        paths.append(
            plot_attention_layers(weights, layers, labels[row_side], labels[col_side], title, path, axis_names)
        )
    return paths


# --------------------------------------------------------------------------- positional encoding


def plot_positional_encoding(path: Path, d_model: int, length: int = 100) -> Path:
    """Dimensions 0, d/8, d/4 and d/2 (rounded to even) of ``sinusoid_table`` over positions.

    Each is a sine whose wavelength grows geometrically with the dimension
    (2π · 10000^(i/d) positions for dimension i): from 2π up to 2π · 100.
    """
    plt = _pyplot()
    pe = sinusoid_table(length, d_model)
    dims = sorted({2 * (d_model * f // 16) for f in (0, 1, 2, 4)})  # even: the sine of each pair
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for dim in dims:
        wavelength = 2 * math.pi * 10000 ** (dim / d_model)
        ax.plot(range(length), pe[:, dim].numpy(), label=f"dim {dim} (wavelength {wavelength:.0f})")
    ax.set_xlabel("position")
    ax.set_ylabel("encoding value")
    ax.set_title(f"Positional encoding, d_model = {d_model}: a few dimensions over positions")
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def plot_positional_heatmap(path: Path, d_model: int, length: int = 100) -> Path:
    """The whole ``sinusoid_table(length, d_model)``: dimension (rows) by position (columns)."""
    plt = _pyplot()
    pe = sinusoid_table(length, d_model)
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    image = ax.imshow(pe.T.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xlabel("position")
    ax.set_ylabel("dimension (even: sin, odd: cos)")
    ax.set_title(f"Positional encoding table, d_model = {d_model}")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


# --------------------------------------------------------------------------- optimizer and loss


def plot_noam_schedule(path: Path, schedules: Sequence[tuple[int, float, int, str]], steps: int = 20000) -> Path:
    """``rate(step)`` over 1..steps for each (d_model, factor, warmup, label)."""
    plt = _pyplot()
    xs = range(1, steps + 1)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for d_model, factor, warmup, label in schedules:
        ax.plot(xs, [rate(s, d_model, factor, warmup) for s in xs], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Noam schedule: linear warmup, then decay as 1/√step")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_label_smoothing(
    path: Path, size: int = 6, smoothing: float = 0.3, targets: Sequence[int] = (3, 1, 0, 4, 2)
) -> Path:
    """``LabelSmoothing.smoothed_targets`` for a few tokens (padding is class 0)."""
    plt = _pyplot()
    crit = LabelSmoothing(size, PAD_ID, smoothing)
    dist = crit.smoothed_targets(torch.tensor(targets))
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    ax.imshow(dist.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(dist.tolist()):
        for j, value in enumerate(row):
            color = "white" if value > 0.5 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(size), ["pad"] + [str(c) for c in range(1, size)])
    ax.set_yticks(range(len(targets)), [f"target {t}" + (" (pad)" if t == PAD_ID else "") for t in targets])
    ax.set_xlabel("class")
    ax.set_title(f"Label smoothing, ε = {smoothing}, V = {size}: target distributions")
    return _save(fig, path)


def smoothing_penalty(confidence: Tensor, size: int, smoothing: float) -> Tensor:
    """``LabelSmoothing`` loss of one token whose model gives probability ``confidence``
    to the correct class and spreads the rest evenly over the other ``size - 1`` classes.

    Every probability is positive, so every log-probability is finite. (The reference
    drew this curve from predictions holding a 0, whose log is −inf, which made the loss
    inf or NaN at those points.)

    Shape:
        confidence (n,) in (0, 1) -> (n,).
    """
    target = torch.tensor([1])  # any class but padding
    probs = ((1 - confidence) / (size - 1)).unsqueeze(1).repeat(1, size)  # (n, size)
    probs[:, 1] = confidence
    crit = LabelSmoothing(size, PAD_ID, smoothing)
    # The criterion sums over tokens: one call per confidence value.
    return torch.stack([crit(row.unsqueeze(0), target) for row in probs.log()])


def plot_label_smoothing_penalty(path: Path, size: int = 10, smoothings: Sequence[float] = (0.0, 0.1, 0.3)) -> Path:
    """The loss against the model's confidence in the correct token, for each ε.

    Without smoothing it falls towards 0 as confidence → 1; with ε > 0 it is lowest at
    confidence 1 − ε and rises again: overconfidence is penalised. Computed with
    ``smoothing_penalty``, which never takes log(0).
    """
    plt = _pyplot()
    confidence = torch.linspace(0.01, 0.995, 200, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for eps in smoothings:
        loss = smoothing_penalty(confidence, size, eps)
        (line,) = ax.plot(confidence.numpy(), loss.numpy(), label=f"ε = {eps}")
        if eps > 0:
            ax.axvline(1 - eps, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("model's probability of the correct token")
    ax.set_ylabel("loss (KL to the smoothed target)")
    ax.set_title(f"Label smoothing penalises confidence above 1 − ε (V = {size})")
    ax.legend(fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- training log


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (one JSON object per line).

    Raises:
        FigureError: naming the file (and line) when it is missing or not JSON lines.
    """
    if not path.is_file():
        raise FigureError(f"{path}: no such metrics file (a run's metrics.jsonl)")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FigureError(f"{path}: cannot read the metrics file ({e})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FigureError(f"{path}, line {n}: not a JSON record ({e.msg})") from e
        if not isinstance(record, dict):
            raise FigureError(f"{path}, line {n}: not a JSON object")
        records.append(record)
    return records


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in the records of ``kind``, sorted by step."""
    points = sorted((r["step"], r[key]) for r in records if r.get("kind") == kind and key in r and "step" in r)
    return [s for s, _ in points], [v for _, v in points]


def plot_training_curve(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Training loss per epoch and validation loss (left); validation BLEU and chrF, and
    the test score, when the log has them (right). The x axis is the optimizer step.

    Raises:
        FigureError: when the records hold no epoch or validation losses.
    """
    train = _series(records, "epoch", "train_loss")
    valid = _series(records, "valid", "valid_loss")
    if not train[0] and not valid[0]:
        raise FigureError("no 'epoch' or 'valid' records with a loss")
    bleu, chrf = _series(records, "valid", "bleu"), _series(records, "valid", "chrf")
    tests = [r for r in records if r.get("kind") == "test" and "bleu" in r]
    plt = _pyplot()
    panels = 2 if bleu[0] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    ax.plot(*train, marker="o", markersize=3, label="training (label-smoothed, per epoch)")
    ax.plot(*valid, marker="s", markersize=3, label="validation (label-smoothed)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token")
    ax.set_title("loss")
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0][1]
        ax.plot(*bleu, marker="o", markersize=3, label="validation BLEU (greedy)")
        if chrf[0]:
            ax.plot(*chrf, marker="s", markersize=3, label="validation chrF (greedy)")
        last = max(train[0] + valid[0])
        for record in tests[-1:]:
            how = f", {record['decoding']}" if "decoding" in record else ""
            ax.plot([last], [record["bleu"]], marker="*", markersize=12, linestyle="",
                    label=f"test BLEU {record['bleu']:.2f}{how}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("score")
        ax.set_title("validation scores")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------- the models


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


# --------------------------------------------------------------------------- all of them


def make_figures(options: FigureOptions) -> FigureReport:
    """Draw the figures of ``FIGURES`` (or those of ``options.only``) into ``options.out``.

    Every input is checked before anything is drawn. The training curve is skipped,
    with the reason in the report, when there is no log to draw it from (no ``log``
    and no metrics.jsonl beside the checkpoint) or the log holds no losses yet.

    Raises:
        CheckpointError: a checkpoint that is missing or unusable (naming the file).
        FigureError: a missing or malformed log file (naming it and the line), layers
            the model does not have, or an unknown figure name.
        ImportError: matplotlib is not installed (with the command that installs it).
    """
    require_matplotlib()
    wanted = list(FIGURES) if options.only is None else list(options.only)
    unknown = [name for name in wanted if name not in FIGURES]
    if unknown:
        raise FigureError(f"--only {unknown[0]}: no such figure (there are {', '.join(FIGURES)})")
    log_path = options.log
    if log_path is not None and not log_path.is_file():
        raise FigureError(f"{log_path}: no such metrics file (a run's metrics.jsonl)")
    schedules = [(d, f, w, f"d_model {d}, warmup {w}" + (f", factor {f:g}" if f != 1 else "")) for d, f, w in SCHEDULES]
    if options.checkpoint is None:
        source = untrained_input(options.sentence, options.target, options.seed)
    else:
        from transformer.checkpoint import load_model
        from transformer.translate import Translator
        from transformer.utils import resolve_device

        device = resolve_device(options.device)
        model, tokenizer, cfg = load_model(options.checkpoint, device)
        translator = Translator(model, tokenizer, cfg.decode, device)
        source = checkpoint_input(translator, options.sentence, options.target, options.checkpoint.name)
        d, f, w = cfg.model.d_model, cfg.train.lr_factor, cfg.train.warmup
        schedules.append((d, f, w, f"this run: d_model {d}, warmup {w}, factor {f:g}"))
        beside = options.checkpoint.parent / "metrics.jsonl"
        if log_path is None and beside.is_file():
            log_path = beside
    chosen_layers(options.layers, len(source.model.encoder.layers))
    records = read_metrics(log_path) if log_path is not None and "training_curve" in wanted else None
    d_model = source.model.src_embed[0].d_model

    drawers = {
        "subsequent_mask": lambda path: plot_subsequent_mask(path),
        "attention_scaling": lambda path: plot_attention_scaling(path, seed=options.seed),
        "positional_encoding": lambda path: plot_positional_encoding(path, d_model),
        "positional_encoding_heatmap": lambda path: plot_positional_heatmap(path, d_model),
        "noam_schedule": lambda path: plot_noam_schedule(path, schedules),
        "label_smoothing": lambda path: plot_label_smoothing(path),
        "label_smoothing_penalty": lambda path: plot_label_smoothing_penalty(path),
    }
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    written = [draw(out / f"{name}.png") for name, draw in drawers.items() if name in wanted]
    kinds = [kind for kind in KINDS if f"attention_{kind}" in wanted]
    if kinds:
        written += plot_attention_figures(source, options.layers, out, kinds)
    skipped = []
    if "training_curve" in wanted:
        if records is None:
            why = "no training log: give --log RUN/metrics.jsonl, or a --checkpoint with one beside it"
            skipped.append(("training_curve", why))
        else:
            try:
                title = f"Training run {log_path.parent.name}"
                written.append(plot_training_curve(records, out / "training_curve.png", title))
            except FigureError as e:
                skipped.append(("training_curve", f"{log_path}: {e}"))
    for name, why in skipped:
        log.warning("skipped %s.png: %s", name, why)
    return FigureReport(tuple(written), tuple(skipped))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transformer.figures",
        description="Draw the Annotated Transformer's figures from this package's code (PNG files).",
        epilog="figures:\n" + "\n".join(f"  {name}.png: {what}" for name, what in FIGURES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("figures"), help="folder for the PNGs (default: figures/)")
    parser.add_argument(
        "--checkpoint", type=Path, help="a trained model for the attention maps (default: an untrained tiny model)"
    )
    parser.add_argument("--sentence", default=DEFAULT_SENTENCE, help=f"source sentence (default: {DEFAULT_SENTENCE!r})")
    parser.add_argument(
        "--target",
        help="what the decoder reads (default: the checkpoint's translation; untrained: "
        f"{UNTRAINED_TARGET!r})",
    )
    parser.add_argument("--layers", type=int, nargs="+", metavar="N", help="1-based layers to draw (default: all)")
    parser.add_argument(
        "--log", type=Path, help="a run's metrics.jsonl for the training curve (default: the checkpoint's run's)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (for --checkpoint)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained model and the q·k samples")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"draw only these figures, of: {', '.join(FIGURES)}"
    )
    args = parser.parse_args(argv)

    from transformer.checkpoint import CheckpointError
    from transformer.utils import setup_logging

    setup_logging()
    options = FigureOptions(
        out=args.out, checkpoint=args.checkpoint, sentence=args.sentence, target=args.target,
        layers=tuple(args.layers) if args.layers else None, log=args.log, device=args.device, seed=args.seed,
        only=tuple(args.only) if args.only else None,
    )
    try:
        report = make_figures(options)
    except (CheckpointError, FigureError, ValueError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in report.written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
