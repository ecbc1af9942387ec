"""The article's figures, redrawn from this package's own code.

Every picture is computed by the functions the model trains and decodes with, so a
figure is also a check that the code does what the article says: the causal mask is
``subsequent_mask``, the encodings ``sinusoid_table``, the schedule ``rate``, the
targets ``LabelSmoothing``. The attention maps are in ``transformer.figures.attention``,
and ``python -m transformer.figures`` draws them all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transformer.data.batching import subsequent_mask
from transformer.data.vocab import PAD_ID
from transformer.figures.drawing import FigureError, pyplot, save
from transformer.model.architecture import sinusoid_table
from transformer.training.loss import LabelSmoothing
from transformer.training.schedule import rate


def plot_subsequent_mask(path: Path, size: int = 20) -> Path:
    """``subsequent_mask(size)``: row i (a query position) may attend to the dark columns 0..i."""
    plt = pyplot()
    mask = subsequent_mask(size)[0]  # (size, size), True = may attend
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.imshow(mask.numpy(), cmap="Greys", vmin=0, vmax=1)
    ticks = range(0, size, max(1, size // 5))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("key position (attended to)")
    ax.set_ylabel("query position (attending)")
    ax.set_title(f"subsequent_mask({size})\ndark: may attend; light: masked (the future)", fontsize=10)
    return save(fig, path)


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
    plt = pyplot()
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
    return save(fig, path)


# --------------------------------------------------------------------------- positional encoding


def plot_positional_encoding(path: Path, d_model: int, length: int = 100) -> Path:
    """Dimensions 0, d/8, d/4 and d/2 (rounded to even) of ``sinusoid_table`` over positions.

    Each is a sine whose wavelength grows geometrically with the dimension
    (2π · 10000^(i/d) positions for dimension i): from 2π up to 2π · 100.
    """
    plt = pyplot()
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
    return save(fig, path)


def plot_positional_heatmap(path: Path, d_model: int, length: int = 100) -> Path:
    """The whole ``sinusoid_table(length, d_model)``: dimension (rows) by position (columns)."""
    plt = pyplot()
    pe = sinusoid_table(length, d_model)
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    image = ax.imshow(pe.T.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xlabel("position")
    ax.set_ylabel("dimension (even: sin, odd: cos)")
    ax.set_title(f"Positional encoding table, d_model = {d_model}")
    fig.colorbar(image, ax=ax)
    return save(fig, path)


# --------------------------------------------------------------------------- optimizer and loss


def plot_noam_schedule(path: Path, schedules: Sequence[tuple[int, float, int, str]], steps: int = 20000) -> Path:
    """``rate(step)`` over 1..steps for each (d_model, factor, warmup, label)."""
    plt = pyplot()
    xs = range(1, steps + 1)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for d_model, factor, warmup, label in schedules:
        ax.plot(xs, [rate(s, d_model, factor, warmup) for s in xs], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Noam schedule: linear warmup, then decay as 1/√step")
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_label_smoothing(
    path: Path, size: int = 6, smoothing: float = 0.3, targets: Sequence[int] = (3, 1, 0, 4, 2)
) -> Path:
    """``LabelSmoothing.smoothed_targets`` for a few tokens (padding is class 0)."""
    plt = pyplot()
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
    return save(fig, path)


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
    plt = pyplot()
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
    return save(fig, path)


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
    plt = pyplot()
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
    return save(fig, path)
