"""Where a training step spends its time on this machine, by kind of op and op by op.

    python benchmarks/step_profile.py [--data-dir data/multi30k] [--steps 4] [--top 25] [--warmup 3]
    python benchmarks/step_profile.py --set train.amp=none      # any --set of train.py
    python benchmarks/step_profile.py --config configs/copy.yaml --set model.N=1 ...

It trains the config's model (default: configs/multi30k.yaml, as train.py would, with its
train.amp) on the first batches of its training data, after --warmup steps and one step of
each timed batch, and prints:
  1. the machine (benchmarks/machine.py: CPU model, features, matmul peaks);
  2. target tokens/s and ms a step over --steps steps run without the profiler (it slows
     small ops down), the model FLOPs per target token with their share of the peak, and
     the page faults a step (fresh pages touched, many while the heap still grows: a run's
     steps meet several times fewer after a few hundred steps, --warmup 250 measures there,
     docs/performance.md);
  3. torch.profiler's self time of the same batches again, by kind of op: matrix
     products, softmax and exp, dtype casts and copies, random numbers, layer norms, the
     optimizer, the other ops (elementwise and reductions); and the step's wall time no
     op accounts for (Python, autograd's engine, numpy: dropout's random numbers are drawn
     there, transformer/fast/dropout.py);
  4. the --top ops by self time, with their calls a step.
Kinds go by op name: dropout's comparison and products count with the other ops. On a CPU
whose bf16 products are fast (AMX) the kinds other than matrix products are what stands
between a step and the matmul peak: profile the same batches before and after a change.
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe  # noqa: E402

from transformer.config import load_config  # noqa: E402
from transformer.fast.flops import batch_training_flops  # noqa: E402
from transformer.fast.memory import set_up_training_memory  # noqa: E402

WARMUP = 3
KINDS = {  # op name -> kind; every other op is "other ops"
    **dict.fromkeys(("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"),
                    "matrix products"),
    **dict.fromkeys(("aten::_softmax", "aten::_log_softmax", "aten::_softmax_backward_data",
                     "aten::_log_softmax_backward_data", "aten::exp", "aten::exp_"), "softmax and exp"),
    **dict.fromkeys(("aten::copy_", "aten::_to_copy"), "casts and copies"),
    **dict.fromkeys(("aten::random_", "aten::uniform_", "aten::bernoulli_", "aten::normal_"), "random numbers"),
    **dict.fromkeys(("aten::native_layer_norm", "aten::native_layer_norm_backward"), "layer norms"),
}


def kind(op: str) -> str:
    if op in KINDS:
        return KINDS[op]
    if "adam" in op.lower() or op.startswith("aten::_foreach"):
        return "optimizer"
    return "other ops"


def epochs(task) -> Iterator:
    """The task's training batches epoch after epoch, as a run sees them (none if it has none)."""
    for epoch in itertools.count():
        empty = True
        for batch in task.train_batches(epoch):
            empty = False
            yield batch
        if empty:
            return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "multi30k.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", type=int, default=4, help="steps timed, then profiled")
    parser.add_argument("--top", type=int, default=25, help="ops listed one by one")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="steps trained first, on other batches")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")

    from transformer.tasks import build_task
    from transformer.training.checkpoint import build_model
    from transformer.training.trainer import Trainer

    set_up_training_memory()  # as train.py does
    overrides = ([f"data.dir={args.data_dir}"] if args.data_dir else []) + ["train.device=cpu"] + args.set
    cfg = load_config(args.config, overrides)
    peaks = describe("cpu")
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg)
    model = build_model(cfg.model, task.tokenizer)
    trainer = Trainer(model, cfg.train, task.tokenizer.pad_id, torch.device("cpu"))
    batches = list(itertools.islice(epochs(task), args.warmup + args.steps))
    if len(batches) < args.warmup + args.steps:
        sys.exit(f"error: the training data gives {len(batches)} batches, {args.warmup + args.steps} are needed")
    warmup, timed = batches[: args.warmup], batches[args.warmup :]
    model.train()
    # The timed batches run once before the clock as well: a batch's first step grows the
    # heap (fresh pages, which cost a lot on some virtual machines) as a long run's first
    # steps do. It also builds oneDNN's kernels for the batch's shapes, which a long run
    # keeps doing for its new shapes (about 27 a step here, docs/performance.md): that
    # cost is left out of the profile.
    for batch in warmup + timed:
        trainer.train_step([batch])

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for batch in timed:
        trainer.train_step([batch])
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    tokens = sum(b.ntokens for b in timed)
    flops = sum(batch_training_flops(cfg.model, task.tokenizer.tgt_vocab_size, b, task.tokenizer.pad_id)
                for b in timed)
    precision = "fp32" if cfg.train.amp == "none" else "bf16"
    step_ms = 1000 * seconds / len(timed)
    print(f"\n{Path(args.config).name}, train.amp {cfg.train.amp}: {tokens / seconds:,.0f} target tokens/s, "
          f"{step_ms:.0f} ms a step, {flops / tokens / 1e6:.1f} MFLOP a target token, "
          f"{100 * flops / seconds / 1e9 / peaks[precision]:.1f}% of the {precision} "
          f"matmul peak ({len(timed)} steps, {tokens / len(timed):,.0f} target tokens a step; "
          f"{faults / len(timed):,.0f} page faults a step)")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for batch in timed:
            trainer.train_step([batch])
        profiled_ms = 1000 * (time.perf_counter() - start) / len(timed)
    events = prof.key_averages()
    n = len(timed)
    by_kind: dict[str, float] = {}
    for e in events:
        k = kind(e.key)
        by_kind[k] = by_kind.get(k, 0.0) + e.self_cpu_time_total / 1000 / n
    ops_ms = sum(by_kind.values())
    print(f"\nunder the profiler: {profiled_ms:.0f} ms a step, of which ops {ops_ms:.0f} ms (self time)")
    print(f"{'kind':<28} {'ms a step':>9} {'of the step':>11}")
    rows = sorted(by_kind.items(), key=lambda kv: -kv[1])
    rows.append(("outside ops (Python, numpy)", max(0.0, profiled_ms - ops_ms)))
    for name, ms in rows:
        print(f"{name:<28} {ms:9.1f} {100 * ms / profiled_ms:10.1f}%")

    print(f"\n{'op':<48} {'kind':<18} {'ms a step':>9} {'calls a step':>12}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"{e.key[:48]:<48} {kind(e.key):<18} {e.self_cpu_time_total / 1000 / n:9.1f} {e.count / n:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
