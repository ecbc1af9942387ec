"""Average the weights of several checkpoints of one run into a new checkpoint.

    python -m transformer.average RUN_DIR --last 3 -o RUN_DIR/avg.pt
    python -m transformer.average a.pt b.pt c.pt -o avg.pt

The article's ``average(model, models)`` snippet, made to work: the parameters of
checkpoints of the same model (same shapes, same vocabulary) are averaged one by one,
and the result is a checkpoint that ``translate.py`` reads like any other. It holds no
optimizer state: it is for translating (or for fine-tuning from), not for resuming.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import torch

from transformer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

STEP_FILE = re.compile(r"step-(\d+)\.pt")


def run_checkpoints(run_dir: Path, last: int) -> list[Path]:
    """The newest ``last`` step-<N>.pt files of a run (see ``train.keep_checkpoints``), oldest first."""
    found = sorted(
        (int(m.group(1)), p) for p in Path(run_dir).glob("step-*.pt") if (m := STEP_FILE.fullmatch(p.name))
    )
    if len(found) < last:
        raise CheckpointError(
            f"{run_dir}: {len(found)} step-<N>.pt checkpoints, fewer than the {last} asked for "
            "(train.keep_checkpoints sets how many a run keeps)"
        )
    return [p for _, p in found[-last:]]


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """The state of the newest checkpoint, with its model weights replaced by the mean
    of all of them (floating-point tensors; others must be equal and are kept).

    Raises:
        CheckpointError: naming the file, for an unreadable checkpoint or one whose
            model (shapes, names, settings) or tokenizer differs from the first's.
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    first_path = Path(paths[0])
    first = load_checkpoint(first_path)
    total = {k: v.double() if v.is_floating_point() else v for k, v in first["model"].items()}
    newest = first
    for path in paths[1:]:
        state = load_checkpoint(path)
        if _shape_settings(state) != _shape_settings(first):
            raise CheckpointError(f"{path}: its model settings differ from those of {first_path}")
        if state["tokenizer"] != first["tokenizer"]:
            raise CheckpointError(f"{path}: its tokenizer or vocabulary differs from that of {first_path}")
        weights = state["model"]
        if weights.keys() != total.keys():
            raise CheckpointError(f"{path}: its parameters are not those of {first_path}")
        for name, value in weights.items():
            if value.shape != total[name].shape:
                raise CheckpointError(
                    f"{path}: parameter {name} has shape {tuple(value.shape)}, "
                    f"{tuple(total[name].shape)} in {first_path}"
                )
            if value.is_floating_point():
                total[name] += value.double()
            elif not torch.equal(value, total[name]):
                raise CheckpointError(f"{path}: {name} differs from {first_path} and cannot be averaged")
        newest = state
    model = {
        name: (value / len(paths)).to(first["model"][name].dtype) if value.is_floating_point() else value
        for name, value in total.items()
    }
    kept = ("config", "tokenizer", "step", "epoch")
    return {
        **{k: newest[k] for k in kept if k in newest},
        "model": model,
        "averaged_from": [str(p) for p in paths],
    }


def _shape_settings(state: dict[str, Any]) -> dict[str, Any]:
    """The model settings that make two checkpoints different models (dropout does not)."""
    return {k: v for k, v in state["config"].get("model", {}).items() if k != "dropout"}


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
