"""Training speed against the hardware's limit, all measured in one run on one machine.

    python benchmarks/train_speed.py [--data-dir data/multi30k] [--steps 20] [--device cpu]
    python benchmarks/train_speed.py --quick          # fewer steps and sizes: a smoke run
    python benchmarks/train_speed.py --default-only   # the peaks and the default config's rows alone

It prints:
  1. the matmul peak of this machine, fp32 and bf16 (the best of a few large products);
  2. for the default CPU config (configs/multi30k.yaml), the base config
     (configs/multi30k_base.yaml) and the default one with train.compile, each in fp32
     and with bf16 autocast (the default config also with train.amp bf16-weights, a bf16
     copy of the model with fp32 master weights): target tokens/s over Multi30k training batches, model
     FLOPs per target token (transformer.flops), the FLOP/s they imply and their share
     of the peak of the same dtype, and the peak memory (resident set on the CPU,
     allocated memory on CUDA);
  3. how the step time of the default config grows with sentence length (16 to 256
     tokens, at the config's batch tokens) and with the batch's token budget.

Each measurement runs in a fresh process (so its memory peak is its own), with the
first steps left out of the timing (warm-up). Run it on an idle machine: a concurrent
job halves the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_features, describe, sync  # noqa: E402

from transformer.config import Config, load_config  # noqa: E402
from transformer.data.batching import Batch  # noqa: E402
from transformer.fast.flops import batch_training_flops  # noqa: E402
from transformer.fast.memory import set_up_training_memory  # noqa: E402

WARMUP = 3  # steps run before the clock starts (1 for the base config: its steps are long)
AMX_TARGET = 0.20  # the default config's bf16 step, as a share of the bf16 matmul peak, on a CPU with AMX


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synthetic_batches(length: int, batch_tokens: int, vocab: int, n: int) -> list[Batch]:
    """n batches of random sentences, every source and target ``length`` tokens long."""
    g = torch.Generator().manual_seed(length)
    rows = max(1, batch_tokens // length)
    batches = []
    for _ in range(n):
        src = torch.randint(4, vocab, (rows, length), generator=g)
        tgt = torch.randint(4, vocab, (rows, length + 1), generator=g)
        tgt[:, 0] = 1
        batches.append(Batch(src, tgt, pad=0))
    return batches


def measure(spec: dict) -> dict:
    """Train ``spec['steps']`` timed steps (after the warm-up) in this process; return figures."""
    from transformer.data.tokenizers import tokenizer_from_state
    from transformer.tasks import build_task
    from transformer.training.checkpoint import build_model
    from transformer.training.trainer import Trainer

    set_up_training_memory()  # as train.py does
    cfg: Config = load_config(spec["config"], spec["overrides"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    tokenizer = tokenizer_from_state(torch.load(spec["tokenizer"], weights_only=True)["tokenizer"])
    model = build_model(cfg.model, tokenizer).to(device)
    trainer = Trainer(model, cfg.train, tokenizer.pad_id, device)
    warmup = spec.get("warmup", WARMUP)
    n = warmup + spec["steps"]
    if spec.get("length"):
        batches = synthetic_batches(spec["length"], cfg.data.batch_tokens, tokenizer.tgt_vocab_size, n)
    else:
        batches = []
        for batch in build_task(cfg, tokenizer).train_batches(0):
            batches.append(batch)
            if len(batches) == n:
                break
    model.train()
    tokens = flops = 0
    for i, batch in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        trainer.train_step([batch])
        if i >= warmup:
            flops += batch_training_flops(cfg.model, tokenizer.tgt_vocab_size, batch, tokenizer.pad_id)
            tokens += batch.ntokens
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "tokens_per_s": tokens / seconds,
        "gflops": flops / seconds / 1e9,
        "mflop_per_token": flops / tokens / 1e6,
        "ms_per_step": 1000 * seconds / spec["steps"],
        "memory_mib": peak_memory_mib(device),
    }


def run_child(spec: dict) -> dict:
    """``measure(spec)`` in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_tokenizer(data_dir: str | None, path: Path) -> None:
    """Learn the default config's tokenizer once, for every measurement to share."""
    from transformer.data.files import read_parallel
    from transformer.data.tokenizers import learn_tokenizer
    from transformer.tasks.translation import corpus_files
    from transformer.training.checkpoint import save_checkpoint

    cfg = load_config(ROOT / "configs" / "multi30k.yaml", [f"data.dir={data_dir}"] if data_dir else [])
    train = read_parallel(*corpus_files(cfg.data)["train"])
    save_checkpoint(path, {"tokenizer": learn_tokenizer(cfg.data, train).state_dict()})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 steps, fewer sizes")
    parser.add_argument("--default-only", action="store_true",
                        help="the peaks and the default config's rows alone (with the AMX verdict on a CPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0

    device = torch.device(args.device)
    steps = 3 if args.quick else args.steps
    data = [f"data.dir={args.data_dir}"] if args.data_dir else []
    tok_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"train_speed_tokenizer_{os.getpid()}.pt"
    make_tokenizer(args.data_dir, tok_path)
    base_spec = {"device": args.device, "tokenizer": str(tok_path), "steps": steps}
    dev = [f"train.device={args.device}"]

    peaks = describe(device)

    print(f"\n{'config':<22} {'amp':<12} {'tok/s':>7} {'MFLOP/tok':>9} {'GFLOP/s':>8} {'of peak':>8} "
          f"{'ms/step':>8} {'memory':>9}")
    # (label, config, timed steps, warm-up steps, extra settings); the compiled rows
    # compile during their warm-up steps (dynamic shapes: once for every batch shape).
    # bf16-weights (a bf16 copy of the model, fp32 master weights) for the default config only.
    configs = [
        ("multi30k.yaml", "multi30k.yaml", steps, WARMUP, [], ("none", "bf16", "bf16-weights")),
        ("multi30k_base.yaml", "multi30k_base.yaml", max(2, steps // 4), 1, [], ("none", "bf16")),
        ("multi30k.yaml compiled", "multi30k.yaml", steps, WARMUP, ["train.compile=true"], ("none", "bf16")),
    ][:1 if args.default_only else None]
    shares = {}
    for label, name, n, warmup, extra, amps in configs:
        for amp in amps:
            spec = dict(base_spec, config=str(ROOT / "configs" / name), steps=n, warmup=warmup,
                        overrides=data + dev + [f"train.amp={amp}"] + extra)
            r = run_child(spec)
            peak = peaks["fp32" if amp == "none" else "bf16"]
            shares[label, amp] = r["gflops"] / peak
            print(f"{label:<22} {amp:<12} {r['tokens_per_s']:7.0f} {r['mflop_per_token']:9.1f} {r['gflops']:8.1f} "
                  f"{100 * r['gflops'] / peak:7.1f}% {r['ms_per_step']:8.0f} {r['memory_mib']:6.0f} MiB")

    default = str(ROOT / "configs" / "multi30k.yaml")
    amp = load_config(default).train.amp
    share = shares["multi30k.yaml", amp if amp != "none" else "bf16"]
    if device.type == "cpu":
        amx = "amx_bf16" in cpu_features()
        verdict = ("PASS" if share >= AMX_TARGET else "FAIL") if amx else "not applicable: this CPU has no AMX"
        print(f"\ndefault config (amp {amp}): {100 * share:.1f}% of the bf16 matmul peak (target on a CPU with AMX: "
              f">= {100 * AMX_TARGET:.0f}%): {verdict}")
    if args.default_only:
        tok_path.unlink(missing_ok=True)
        return 0
    print(f"\nmulti30k.yaml (amp {amp}), step time by sentence length (random tokens, source = target length)")
    print(f"{'length':>6} {'sentences':>9} {'ms/step':>8} {'tok/s':>7} {'GFLOP/s':>8}")
    batch_tokens = load_config(default).data.batch_tokens
    for length in (16, 64, 256) if args.quick else (16, 32, 64, 128, 256):
        r = run_child(dict(base_spec, config=default, overrides=data + dev, length=length))
        print(f"{length:6d} {max(1, batch_tokens // length):9d} {r['ms_per_step']:8.0f} {r['tokens_per_s']:7.0f} "
              f"{r['gflops']:8.1f}")

    print(f"\nmulti30k.yaml (amp {amp}), by batch token budget (Multi30k batches)")
    print(f"{'budget':>6} {'ms/step':>8} {'tok/s':>7} {'GFLOP/s':>8} {'memory':>9}")
    for budget in (1024, 4096, 16384) if args.quick else (1024, 2048, 4096, 8192, 16384):
        r = run_child(dict(base_spec, config=default, overrides=data + dev + [f"data.batch_tokens={budget}"]))
        print(f"{budget:6d} {r['ms_per_step']:8.0f} {r['tokens_per_s']:7.0f} {r['gflops']:8.1f} "
              f"{r['memory_mib']:6.0f} MiB")
    tok_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
