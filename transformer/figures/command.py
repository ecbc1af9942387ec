"""``python -m transformer.figures``: every figure of the article, from this package's code.

With ``--checkpoint`` the attention maps come from that model, its tokenizer and its
translation of ``--sentence``, and the training curve from the ``metrics.jsonl`` of its
run directory; without one, from an untrained tiny model (random weights, said so in
the titles), so the command runs anywhere, offline, in seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from transformer.figures.article import (
    plot_attention_scaling,
    plot_label_smoothing,
    plot_label_smoothing_penalty,
    plot_noam_schedule,
    plot_positional_encoding,
    plot_positional_heatmap,
    plot_subsequent_mask,
    plot_training_curve,
    read_metrics,
)
from transformer.figures.attention import (
    DEFAULT_SENTENCE,
    KINDS,
    UNTRAINED_TARGET,
    checkpoint_input,
    chosen_layers,
    plot_attention_figures,
    untrained_input,
)
from transformer.figures.drawing import FigureError, require_matplotlib

log = logging.getLogger(__name__)

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
        from transformer.inference.translator import Translator
        from transformer.runtime import resolve_device
        from transformer.training.checkpoint import load_model

        device = resolve_device(options.device, "--device")
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
    d_model = source.model.d_model

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

    from transformer.runtime import setup_logging
    from transformer.training.checkpoint import CheckpointError

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
