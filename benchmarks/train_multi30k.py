"""Train on Multi30k with `train.py` and print the figures the targets are judged on.

    python benchmarks/train_multi30k.py [--config configs/multi30k.yaml] [--set key=value ...]
    python benchmarks/train_multi30k.py --report RUN_DIR    # figures of a finished run

It prints the wall time of the whole command, the training throughput, the validation
curve, the length penalty chosen on validation (train.tune_length_penalty) and the test
scores of the best checkpoint (sacreBLEU with its signature, chrF, lowercased BLEU), from
the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from machine import describe  # noqa: E402


def report(run_dir: Path, wall: float | None) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    valid = [r for r in records if r["kind"] == "valid"]
    test = [r for r in records if r["kind"] == "test"]
    print(f"run: {run_dir}")
    describe(peaks=False)
    if wall is not None:
        print(f"wall time of the command: {wall / 60:.1f} min")
    if epochs:
        seconds = sum(e["seconds"] for e in epochs)
        tokens = sum(e["tokens_per_s"] * e["seconds"] for e in epochs)
        print(f"training: {len(epochs)} epochs, {epochs[-1]['step']} steps, {seconds / 60:.1f} min in epochs, "
              f"{tokens / seconds:.0f} target tokens/s on average")
    for r in valid:
        bleu = f", BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f}" if "bleu" in r else ""
        print(f"  valid @ step {r['step']:>5} (epoch {r['epoch']}): loss {r['valid_loss']:.4f}{bleu}")
    for r in records:
        if r["kind"] == "length_penalty":
            tried = ", ".join(f"alpha {alpha:g} {bleu:.2f}" for alpha, bleu in r["valid_bleu"])
            print(f"length penalty chosen on validation: {r['chosen']:g} (beam {r['beam_size']} BLEU: {tried})")
    for r in test:
        print(f"test (best.pt, {r['decoding']}): BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f}, "
              f"lowercased BLEU {r['bleu_lc']:.2f}  [{r['signature']}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "multi30k.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--report", type=Path, help="only print the figures of this finished run")
    args = parser.parse_args()
    if args.report is not None:
        report(args.report, None)
        return 0
    command = [sys.executable, str(ROOT / "train.py"), "--config", args.config]
    for o in args.overrides:
        command += ["--set", o]
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return result.returncode
    report(Path(result.stdout.strip().splitlines()[-1]), wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
