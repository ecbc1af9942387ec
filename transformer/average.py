"""Average the weights of several checkpoints of one run into a new checkpoint.

    python -m transformer.average RUN_DIR --last 3 -o RUN_DIR/avg.pt
    python -m transformer.average a.pt b.pt c.pt -o avg.pt

The article's ``average(model, models)`` snippet, made to work
(``transformer.training.checkpoint.average_checkpoints``): the result is a checkpoint
that ``translate.py`` reads like any other. It holds no optimizer state: it is for
translating (or for fine-tuning from), not for resuming.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformer.training.checkpoint import CheckpointError, average_checkpoints, run_checkpoints, save_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transformer.average", description="Average the weights of checkpoints of one model."
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="checkpoint files, or one run directory with --last")
    parser.add_argument("--last", type=int, help="average the newest N step-<N>.pt files of the run directory")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the averaged checkpoint to write")
    args = parser.parse_args(argv)
    try:
        if args.last is not None:
            if len(args.inputs) != 1 or not args.inputs[0].is_dir():
                parser.error("--last takes exactly one run directory")
            if args.last < 1:
                parser.error("--last must be at least 1")
            paths = run_checkpoints(args.inputs[0], args.last)
        else:
            paths = args.inputs
        if args.output.resolve() in {p.resolve() for p in paths}:
            parser.error(f"{args.output} is one of the inputs; write the average to a new file")
        save_checkpoint(args.output, average_checkpoints(paths))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"averaged {len(paths)} checkpoints into {args.output}: {', '.join(p.name for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
