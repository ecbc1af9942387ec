"""Does the copy task learn to copy? Exact copies of fresh random sequences, by seed and precision.

    python benchmarks/copy_task.py [--seeds 1234 4321 2026] [--amp none bf16] [--sequences 1000]
                                   [--config configs/copy.yaml] [--set KEY=VALUE ...]

For every seed and autocast setting it trains ``configs/copy.yaml`` as ``train.py``
does (a fresh run directory under a temporary folder), then greedy-decodes
``--sequences`` random sequences drawn from the config's own distribution (lengths
in [min_len, seq_len]) and as many of every length from 1 to seq_len, with a generator
of their own (not the training seed's), and prints the share copied exactly, the
token accuracy and the wall time of training. The CPU and its matmul peaks come first.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe  # noqa: E402

from transformer.config import load_config  # noqa: E402
from transformer.inference.translator import Translator  # noqa: E402
from transformer.tasks.copy import random_sequences  # noqa: E402
from transformer.training.run import run_training  # noqa: E402

EVAL_SEED = 20261130  # the test sequences' own generator, apart from every training stream


def accuracy(translator: Translator, sequences: list[list[int]]) -> tuple[int, float]:
    """(sequences copied exactly, share of positions copied right)."""
    outputs = translator.translate_ids(sequences)
    exact = sum(out == seq for out, seq in zip(outputs, sequences))
    right = sum(sum(a == b for a, b in zip(out, seq)) for out, seq in zip(outputs, sequences))
    return exact, right / sum(len(s) for s in sequences)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "copy.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 4321, 2026])
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    describe()
    logging.disable(logging.INFO)  # the runs' own progress lines
    print(f"config {args.config} {' '.join(args.overrides)}")
    print(f"{'seed':>6} {'amp':<5} {'train s':>8} {'exact':>12} {'tokens':>8} {'exact, lengths 1..L':>20}")
    with tempfile.TemporaryDirectory() as tmp:
        for amp in args.amp:
            for seed in args.seeds:
                run_dir = Path(tmp) / f"{amp}-{seed}"
                cfg = load_config(args.config, [*args.overrides, f"train.seed={seed}", f"train.amp={amp}",
                                                f"train.run_dir={run_dir}"])
                start = time.perf_counter()
                run_training(cfg, demo_sentences=0)
                seconds = time.perf_counter() - start
                translator = Translator.from_checkpoint(run_dir / "last.pt", device="cpu")
                task = cfg.data.copy
                g = torch.Generator().manual_seed(EVAL_SEED)
                exact, tokens = accuracy(translator, random_sequences(task, args.sequences, g))
                every_length = dataclasses.replace(task, min_len=1)
                short_exact, _ = accuracy(translator, random_sequences(every_length, args.sequences, g))
                n = args.sequences
                print(f"{seed:6d} {amp:<5} {seconds:8.1f} {exact:5d}/{n} {100 * exact / n:5.1f}% "
                      f"{100 * tokens:7.2f}% {short_exact:6d}/{n} {100 * short_exact / n:5.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
