"""Command-line entry points (``train.py`` and ``translate.py`` at the top call these)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformer.checkpoint import CheckpointError
from transformer.config import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "copy.yaml"


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
    args = parser.parse_args(argv)

    from transformer.config import load_config
    from transformer.experiment import run_training

    path = args.config if args.config is not None else DEFAULT_CONFIG
    try:
        cfg = load_config(path, args.overrides)
        result = run_training(cfg, name=path.stem)
    except (ConfigError, CheckpointError) as e:
        return _fail(str(e))
    print(result.run_dir)
    return 0


def _read_lines(path: str) -> list[str]:
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="strict") as f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from e


def translate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Translate sentences with a trained checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by train.py")
    parser.add_argument("sentences", nargs="*", help="sentences to translate (default: --input, else stdin)")
    parser.add_argument("--input", help="file with one sentence per line (plain or .gz)")
    parser.add_argument("--output", help="write translations here instead of stdout")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=None, help="sentences decoded together")
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute the whole prefix at every step (the reference's way)"
    )
    args = parser.parse_args(argv)

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
            lines = _read_lines(args.input)
        else:
            lines = [line.rstrip("\r\n") for line in sys.stdin]
        outputs = translator.translate(lines)
    except (ConfigError, CheckpointError, ValueError) as e:
        return _fail(str(e))
    text = "".join(out + "\n" for out in outputs)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
