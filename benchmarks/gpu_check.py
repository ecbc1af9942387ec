"""Everything that has never run on CUDA, in one go, on a machine with a GPU.

    python benchmarks/gpu_check.py [--data DIR] [--report FILE] [--budget SECONDS]
    python benchmarks/gpu_check.py --device cpu --config configs/multi30k.yaml --quick   # a smoke run here

Made for the few sessions that are lent a GPU for minutes. It runs these checks one after
another, the most wanted first, each with its own time limit and all within ``--budget``
(540 s; a check that would start with less than 30 s left is skipped and counted failed):

* ``configs/multi30k_base.yaml`` trained for ``--minutes`` (2) with bf16 autocast: its
  test BLEU is the base config's after that long;
* ``translate.py --device cuda`` on test2016 with that run's ``best.pt``: greedy with and
  without the cache (the outputs must be equal) and beam 5;
* ``--steps`` (100) steps each with fp16 autocast (and its gradient scaler) and with
  ``train.amp: bf16-weights``;
* ``torchrun`` with one process, and with two (``bf16-weights``, whose gradients are
  all-reduced in fp32 by a communication hook): NCCL takes one process per GPU, so on a
  one-GPU machine the second must stop with our error saying so, and with two GPUs it
  must train over NCCL;
* beam 5 with ``--dtype bf16`` and fp16;
* the default config's training step on two of the host's CPUs (``train_speed.py
  --default-only``): GPU hosts may have AMX, and its share of the bf16 matmul peak is
  a target on such a CPU;
* the test files where every run that leaves the device to ``auto`` (the CLI tests) and
  the device-generic tests run on CUDA (``DEVICE_TESTS``; the image has no spacy), with
  8 pytest-xdist workers where it is installed;
* last, as it can take whatever is left: ``train.compile`` (``TORCH_LOGS=recompiles``).

It prints one line per check (its result, seconds and figures) and writes them, with the
last 30 lines of each check's output, to ``--report``; each whole output is kept under
``--work``/logs. A failing check does not stop the others. Multi30k is read from
``data/multi30k`` (``--data DIR`` links a folder there).

Through the device tool (no network there, and ``../shared`` does not travel): copy the
data into an ignored folder of the checkout and carry it, e.g. ``mkdir -p .gpu && cp -L
data/multi30k/* .gpu/ && echo /.gpu/ >> .git/info/exclude``, then run
``PYTHONPATH=. python3 benchmarks/gpu_check.py --data .gpu --report $OUT/report.txt``
with ``carry: [".gpu"]`` and ``timeout_s`` 600. Its image has torch, sentencepiece,
sacrebleu and pytest; the server's and export's tests skip there without FastAPI and
CTranslate2 (carry their wheels to include them).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from machine import describe  # noqa: E402


@dataclass
class Check:
    name: str
    argv: list[str]
    timeout: float  # seconds
    run_dir: Path | None = None  # a training run's folder, read for its figures
    expect_failure: str | None = None  # the check passes when it fails with this in its output
    shown: str | None = None  # a pattern: the lines of its output that are its figures
    env: dict[str, str] | None = None  # set for its process, beside the inherited environment


def train_argv(config: str, device: str, run_dir: Path, *sets: str) -> list[str]:
    keys = [f"train.device={device}", f"train.run_dir={run_dir}", "train.tune_length_penalty=[]", *sets]
    return [sys.executable, "train.py", "--config", config] + [a for k in keys for a in ("--set", k)]


def plan(device: str, work: Path, config: str, minutes: float, steps: int, quick: bool) -> list[Check]:
    """The checks, the most wanted first (a check that would outrun the budget is skipped)."""
    cuda = device.startswith("cuda")
    runs = {name: work / name for name in ("bf16", "fp16", "bf16-weights", "compile", "torchrun1", "torchrun2")}
    limit = f"train.max_steps={steps}"
    best = str(runs["bf16"] / "best.pt")
    test = ["--input", "data/multi30k/test_2016_flickr.de.gz", "--reference", "data/multi30k/test_2016_flickr.en.gz"]
    decode = [sys.executable, "translate.py", "--checkpoint", best, "--device", device, *test]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    short = ("train.amp=bf16", f"train.max_steps={max(steps // 3, 2)}")
    gpus = gpu_count() if cuda else 2
    checks = [
        Check("environment", [sys.executable, "-c", ENVIRONMENT, device], 60, shown=r"torch |device |a product"),
        Check("train bf16 autocast", train_argv(config, device, runs["bf16"], "train.amp=bf16",
                                                f"train.max_minutes={minutes}"), 60 * minutes + 180, runs["bf16"]),
        Check("translate greedy, cache", decode + ["--beam-size", "1", "--output", str(work / "greedy.txt")], 120),
        Check("translate greedy, no cache", decode + ["--beam-size", "1", "--no-cache",
                                                      "--output", str(work / "greedy-nocache.txt")], 180),
        Check("translate beam 5", decode + ["--beam-size", "5", "--output", str(work / "beam.txt")], 120),
    ]
    if cuda:  # fp16 is refused on the CPU (config check)
        checks.append(Check("train fp16 autocast", train_argv(config, device, runs["fp16"], "train.amp=fp16", limit),
                            240, runs["fp16"]))
    checks += [
        Check("train bf16-weights", train_argv(config, device, runs["bf16-weights"], "train.amp=bf16-weights", limit),
              240, runs["bf16-weights"]),
        Check("torchrun, 1 process", torchrun + ["--nproc_per_node", "1"]
              + train_argv(config, device, runs["torchrun1"], *short)[1:], 180, runs["torchrun1"]),
        # bf16-weights: its gradients' fp32 all-reduce is a DDP communication hook.
        Check(f"torchrun, 2 processes, {'NCCL' if cuda else 'gloo'}, bf16-weights", torchrun + ["--nproc_per_node", "2"]
              + train_argv(config, device, runs["torchrun2"], "train.amp=bf16-weights", short[1])[1:], 180,
              runs["torchrun2"],
              expect_failure="use at most one process per GPU" if gpus < 2 else None),
        Check("translate beam 5 bf16", decode + ["--beam-size", "5", "--dtype", "bf16",
                                                 "--output", str(work / "beam-bf16.txt")], 120),
    ]
    if cuda:
        checks.append(Check("translate beam 5 fp16", decode + ["--beam-size", "5", "--dtype", "fp16",
                                                               "--output", str(work / "beam-fp16.txt")], 120))
    if not quick:
        # The host of a GPU may be a CPU with AMX, which the 2-core machines seldom are: the default
        # config's CPU step on two of its CPUs, against its bf16 matmul peak.
        pin = ["taskset", "-c", "0,1"] if shutil.which("taskset") and len(os.sched_getaffinity(0)) > 2 else []
        checks.append(Check("CPU training step, 2 threads", pin + [sys.executable, "benchmarks/train_speed.py",
                                                                   "--default-only", "--steps", "8"],
                            150, shown=r"CPU: |matmul peak|default config", env={"OMP_NUM_THREADS": "2"}))
        workers = ["-n", "8"] if importlib.util.find_spec("xdist") else []  # pytest-xdist, where installed
        checks.append(Check(f"tests on {device}", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                              *workers, *DEVICE_TESTS], 600))
    # Last, as it may take what is left: compiling for every batch shape's guards; the log names
    # each recompilation.
    checks.append(Check("train compile", train_argv(config, device, runs["compile"], "train.amp=bf16",
                                                    "train.compile=true", limit), 360, runs["compile"],
                        env={"TORCH_LOGS": "recompiles"}))
    return checks


# The test files whose runs take the device from torch (the CLIs' train.device auto, the
# device-generic tests): none of them needs spacy or the extras, which the GPU image lacks.
DEVICE_TESTS = [f"tests/test_{name}.py" for name in
                ("train", "model", "search", "cli", "resume", "distributed", "checkpoint", "average")]


# Prints what the figures of the other checks depend on; exits 1 when the device is missing.
ENVIRONMENT = """
import sys, torch
device = torch.device(sys.argv[1])
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
if device.type == "cuda":
    nccl = torch.cuda.nccl.version()
    print("device", torch.cuda.get_device_name(device), "count", torch.cuda.device_count(),
          "bf16", torch.cuda.is_bf16_supported(), "NCCL", nccl if isinstance(nccl, int) else ".".join(map(str, nccl)))
x = torch.randn(4096, 4096, device=device)
print("a product on", device, float((x @ x).float().norm()) > 0)
"""


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def figures(check: Check, output: str) -> str:
    """What a check measured: a training run's speed and scores, a decoding's BLEU."""
    found = [line for line in output.splitlines() if re.match(check.shown, line)] if check.shown else []
    if check.run_dir is not None and (check.run_dir / "metrics.jsonl").exists():
        records = [json.loads(line) for line in (check.run_dir / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in records if r["kind"] == "epoch"]
        valid = [r for r in records if r["kind"] == "valid"]
        test = [r for r in records if r["kind"] == "test"]
        if epochs:
            seconds = sum(e["seconds"] for e in epochs)
            tokens = sum(e["tokens_per_s"] * e["seconds"] for e in epochs)
            found.append(f"{epochs[-1]['step']} steps, {tokens / seconds:,.0f} target tokens/s")
        if valid:
            found.append(f"valid loss {valid[-1]['valid_loss']:.3f}, BLEU {valid[-1]['bleu']:.2f}")
        if test:
            found.append(f"test BLEU {test[-1]['bleu']:.2f} ({test[-1]['decoding']})")
    bleu = re.findall(r"^BLEU ([\d.]+) \(", output, re.MULTILINE)  # translate.py --reference
    if bleu:
        found.append(f"BLEU {bleu[-1]}")
    return "; ".join(found)


def run(check: Check, log_dir: Path, timeout: float) -> tuple[bool, float, str, str]:
    """Run one check for ``timeout`` seconds at most; (passed, seconds, its figures, the
    end of its output)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(check.argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(check.env or {})})
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        output += f"\n(stopped after {timeout:.0f} s)"
        rc = None
    seconds = time.perf_counter() - start
    (log_dir / (re.sub(r"\W+", "-", check.name) + ".log")).write_text(output)
    if check.expect_failure is not None:
        passed = rc not in (0, None) and check.expect_failure in output
    else:
        passed = rc == 0
    status = "ok" if passed else ("TIMEOUT" if rc is None else f"FAIL (exit {rc})")
    return passed, seconds, f"{status}; {figures(check, output)}", "\n".join(output.splitlines()[-30:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu for a smoke run here")
    parser.add_argument("--config", default="configs/multi30k_base.yaml")
    parser.add_argument("--minutes", type=float, default=2.0, help="the bf16 run's training time (default 2)")
    parser.add_argument("--steps", type=int, default=100, help="steps of each other training run (default 100)")
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds for all the checks together; each gets at most what is left (default 540)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 steps, 0.3 minutes, no tests")
    parser.add_argument("--data", type=Path, help="a folder holding Multi30k, linked to data/multi30k")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"), help="run folders and logs")
    parser.add_argument("--report", type=Path, help="write the summary and each check's last lines here")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.steps = 0.3, 5
    if args.data is not None and not (ROOT / "data" / "multi30k").exists():
        (ROOT / "data").mkdir(exist_ok=True)
        (ROOT / "data" / "multi30k").symlink_to(args.data.resolve())
    if not (ROOT / "data" / "multi30k" / "train.de.gz").exists():
        sys.exit(f"no Multi30k in {ROOT / 'data' / 'multi30k'}: pass --data DIR")
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "logs").mkdir(exist_ok=True)
    describe(peaks=False)
    results, end = [], time.perf_counter() + args.budget
    for check in plan(args.device, args.work.resolve(), args.config, args.minutes, args.steps, args.quick):
        left = end - time.perf_counter()
        if left < 30:
            line = f"{check.name:<34} skipped: the budget of {args.budget:.0f} s is spent"
            print(line, flush=True)
            results.append((line, check, "", False))
            continue
        passed, seconds, summary, tail = run(check, args.work / "logs", min(check.timeout, left))
        line = f"{check.name:<34} {seconds:7.1f} s  {summary}"
        print(line, flush=True)
        results.append((line, check, tail, passed))
    outputs = {p.stem: p.read_text().splitlines() for p in args.work.glob("*.txt") if p.stem.startswith("greedy")}
    if len(outputs) == 2:
        same = sum(a == b for a, b in zip(outputs["greedy"], outputs["greedy-nocache"]))
        line = f"greedy outputs, cache against none: {same} of {len(outputs['greedy'])} equal"
        print(line)
        results.append((line, None, "", same == len(outputs["greedy"])))
    failed = [r for r in results if not r[3]]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed")
    if args.report is not None:
        parts = [r[0] for r in results]
        parts += [f"\n===== {c.name}: {' '.join(c.argv)}\n{tail}" for _, c, tail, _ in results if c is not None]
        args.report.write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
