"""Command-line entry points (``train.py`` and ``translate.py`` at the top call these)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformer.checkpoint import CheckpointError
from transformer.config import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "multi30k.yaml"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train an Annotated Transformer model.")
    parser.add_argument(
        "--config", type=Path, default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name} from configs/)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config field, e.g. --set train.warmup=400 (repeatable)",
    )
    parser.add_argument("--data-dir", help="folder holding the Multi30k files (same as --set data.dir=...)")
    args = parser.parse_args(argv)

    from transformer.config import load_config
    from transformer.data import DataError
    from transformer.experiment import run_training
    from transformer.utils import keep_freed_memory

    keep_freed_memory()
    path = args.config if args.config is not None else DEFAULT_CONFIG
    overrides = list(args.overrides)
    if args.data_dir is not None:
        overrides.append(f"data.dir={args.data_dir}")
    try:
        cfg = load_config(path, overrides)
        result = run_training(cfg, name=path.stem)
    except (ConfigError, CheckpointError, DataError) as e:
        return _fail(str(e))
    print(result.run_dir)
    return 0


def translate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Translate sentences with a trained checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by train.py")
    parser.add_argument("sentences", nargs="*", help="sentences to translate (default: --input, else stdin)")
    parser.add_argument("--input", help="file with one sentence per line (plain or .gz)")
    parser.add_argument("--output", help="write translations here instead of stdout")
    parser.add_argument("--reference", help="reference translations (one per line): print BLEU and chrF to stderr")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=None, help="sentences decoded together")
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute the whole prefix at every step (the reference's way)"
    )
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    from transformer.data import DataError, read_lines
    from transformer.evaluate import score
    from transformer.translate import Translator
    from transformer.utils import setup_logging

    setup_logging()
    overrides = {"cache": not args.no_cache}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    try:
        translator = Translator.from_checkpoint(args.checkpoint, device=args.device, **overrides)
        if args.sentences:
            lines = args.sentences
        elif args.input:
            lines = read_lines(Path(args.input))
        else:
            lines = [line.strip() for line in sys.stdin]
        references = read_lines(Path(args.reference)) if args.reference else None
        if references is not None and len(references) != len(lines):
            raise DataError(f"{args.reference}: {len(references)} references for {len(lines)} input lines")
        outputs = translator.translate(lines)
    except (ConfigError, CheckpointError, DataError, ValueError) as e:
        return _fail(str(e))
    text = "".join(out + "\n" for out in outputs)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if references is not None:
        print(score(outputs, references).summary(), file=sys.stderr)
    return 0
