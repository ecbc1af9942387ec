"""Prepared corpora as they grow: the time and memory of a prepare, and of training on one.

    python benchmarks/prepare_corpus.py [--sizes 29000,1000000,5000000] [--steps 200]
        [--workdir /tmp/prepare-bench] [--data-dir data/multi30k] [--config configs/multi30k.yaml]
        [--keep] [--json PATH] [--set KEY=VALUE ...]
    python benchmarks/prepare_corpus.py --sizes 29000,100000 --steps 5   # a smoke run
    python benchmarks/prepare_corpus.py --set data.sp_alpha=0   # the best segmentation only

For every size N it makes a corpus of N pairs from Multi30k's training lines, repeated:
copy 0 is Multi30k as it is (so the 29,000-pair corpus is its training set), copy k > 0
has " (k)" appended to its German and its English lines, so that no two lines are the
same. The corpora are written once as plain text into the workdir, streamed, and kept
there for the next run (they take minutes to make); Multi30k's val files validate. Then:

  1. prepare: ``python -m transformer.prepare`` into a fresh ``data.prepared`` folder:
     the wall time of the command, pairs read per second (every split's lines over that
     time), the peak resident memory of its process tree (the prepare and its encoding
     workers, VmRSS and RssAnon summed, sampled every 0.1 s from /proc) and the bytes on
     disk per token (every file of the folder over every split's tokens);
  2. train: ``train.py``'s main on that corpus, through a driver that takes its clock at
     its first statement: the seconds to the end of the first optimizer step, and the
     peak memory of the process tree (VmRSS, and RssAnon, which leaves out the pages of
     the memory-mapped corpus) up to the end of step ``--steps``; then a SIGINT, which
     has it save last.pt and exit;
  3. resume: the same for ``train.py --resume`` of that run, for ``--steps`` more steps.

It ends with a table (a row per size) and the verdicts on the targets: training's peak
memory at 5M pairs within 1 GiB of its peak at 29k, the first step on a prepared 5M
corpus within 15 s, a prepare of at least 50,000 pairs/s (at the largest size, where the
start-up costs weigh least). With other sizes, the largest and smallest measured stand
in for 5M and 29k, and the verdict says so. Run folders and prepared corpora are
removed at the end unless --keep. Run it on an idle machine: a concurrent job slows the
prepare's worker processes and the training steps alike.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from machine import cpu_model, describe  # noqa: E402

MULTI30K_TRAIN = 29_000
SAMPLE_EVERY = 0.1  # seconds between two memory samples
TARGET_MEMORY_MIB = 1024  # training's peak at 5M pairs over its peak at 29k, at most
TARGET_FIRST_STEP_S = 15.0  # start to the first step on a prepared 5M corpus, at most
TARGET_PAIRS_PER_S = 50_000  # prepare throughput, at least

# The training process: its clock starts at its first statement; it reports this
# process's first optimizer step and its STEPS-th (STEP <n> <seconds> <trainer step>),
# then runs train.py's main with the arguments after STEPS.
DRIVER = """\
import time
T0 = time.perf_counter()
import sys
STEPS = int(sys.argv[1])
from transformer.cli import train_main
from transformer.training.trainer import Trainer
_train_step = Trainer.train_step
_calls = 0
def train_step(self, *args, **kwargs):
    global _calls
    result = _train_step(self, *args, **kwargs)
    _calls += 1
    if _calls in (1, STEPS):
        print(f"STEP {_calls} {time.perf_counter() - T0:.3f} {self.state.step}", flush=True)
    return result
Trainer.train_step = train_step
sys.exit(train_main(sys.argv[2:]))
"""


# ----------------------------------------------------------------------------- corpora


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
    return n


def read_raw(path: Path) -> list[bytes]:
    """A (gzip) text file's lines as bytes, each ending with a newline."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return [line if line.endswith(b"\n") else line + b"\n" for line in f]


def varied(lines: list[bytes], k: int) -> bytes:
    """Copy ``k`` of ``lines``, as one block: copy 0 as it is, copy k > 0 with " (k)" after
    each line's text (an empty line stays empty)."""
    if k == 0:
        return b"".join(lines)
    marker = f" ({k})\n"
    out = []
    for line in lines:
        text = line.decode("utf-8").strip()
        out.append((text + marker if text else "\n").encode("utf-8"))
    return b"".join(out)


def make_corpus(data_dir: Path, folder: Path, pairs: int, src: str = "de", tgt: str = "en") -> tuple[Path, Path]:
    """The two files of the ``pairs``-pair corpus in ``folder``: reused when both have
    that many lines, else written (into temporary files, renamed when complete)."""
    paths = tuple(folder / f"multi30k-x{pairs}.{lang}" for lang in (src, tgt))
    if all(p.is_file() for p in paths) and all(count_lines(p) == pairs for p in paths):
        print(f"corpus of {pairs:,} pairs: {paths[0].parent} (made before)", flush=True)
        return paths
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    for lang, path in zip((src, tgt), paths):
        lines = read_raw(data_dir / f"train.{lang}.gz")
        if len(lines) != MULTI30K_TRAIN:
            raise SystemExit(f"{data_dir / f'train.{lang}.gz'}: {len(lines)} lines, expected {MULTI30K_TRAIN}")
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb", buffering=1 << 20) as f:
            left, k = pairs, 0
            while left > 0:
                part = lines[:left]
                f.write(varied(part, k))
                left -= len(part)
                k += 1
        os.replace(tmp, path)
    print(f"corpus of {pairs:,} pairs: made in {time.perf_counter() - start:.1f} s "
          f"({sum(p.stat().st_size for p in paths) / 2**20:.0f} MiB)", flush=True)
    return paths


# ----------------------------------------------------------------------------- memory


def _ppid(pid: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rpartition(")")[2].split()[1])  # after the command name, which may hold spaces


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants alive now (from the parents in /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (parent := _ppid(entry)) is not None:
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def status_kib(pid: int, keys: tuple[str, ...] = ("VmRSS", "RssAnon", "VmHWM")) -> dict[str, int]:
    """Fields of /proc/<pid>/status in KiB ({} once the process is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


class TreeMemory:
    """The peak resident memory of a process and its descendants, summed over them, from
    samples (``sample()`` every SAMPLE_EVERY seconds); also the root's own high-water mark."""

    def __init__(self, root: int):
        self.root = root
        self.rss = self.anon = self.hwm = 0  # KiB
        self.processes = self.samples = 0

    def sample(self) -> None:
        rss = anon = alive = 0
        for pid in process_tree(self.root):
            fields = status_kib(pid)
            if not fields:
                continue
            alive += 1
            rss += fields.get("VmRSS", 0)
            anon += fields.get("RssAnon", 0)
            if pid == self.root:
                self.hwm = max(self.hwm, fields.get("VmHWM", 0))
        self.rss, self.anon = max(self.rss, rss), max(self.anon, anon)
        self.processes = max(self.processes, alive)
        self.samples += 1

    def figures(self) -> dict[str, float]:
        return {"peak_rss_mib": self.rss / 1024, "peak_anon_mib": self.anon / 1024, "root_hwm_mib": self.hwm / 1024,
                "processes": self.processes, "samples": self.samples}


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").replace("\r", "\n").splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- measurements


def measure_prepare(config: Path, corpus: tuple[Path, Path], valid: tuple[Path, Path], folder: Path,
                    log: Path) -> dict:
    """``python -m transformer.prepare`` into a fresh ``folder``: time, memory, manifest figures."""
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "transformer.prepare", "--config", str(config),
               "--set", f"data.train={json.dumps([str(p) for p in corpus])}",
               "--set", f"data.valid={json.dumps([str(p) for p in valid])}",
               "--set", f"data.prepared={folder}"]
    with open(log, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
        memory = TreeMemory(proc.pid)
        try:
            while proc.poll() is None:
                memory.sample()
                time.sleep(SAMPLE_EVERY)
        finally:
            if proc.poll() is None:
                proc.kill()
        seconds = time.perf_counter() - start
        out = proc.stdout.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed (exit {proc.returncode}): {' '.join(command)}\n{tail(log)}")
    prepared = Path(out.strip().splitlines()[-1])
    manifest = json.loads((prepared / "manifest.json").read_text())
    lines = sum(s["lines"] for s in manifest["splits"].values())
    tokens = sum(s["src_tokens"] + s["tgt_tokens"] for s in manifest["splits"].values())
    disk = sum(manifest["files"].values())
    return {"seconds": seconds, "build_seconds": manifest["seconds"], "lines": lines, "pairs_per_s": lines / seconds,
            "tokens": tokens, "disk_bytes": disk, "bytes_per_token": disk / max(tokens, 1),
            "train": manifest["splits"]["train"], **memory.figures()}


def measure_training(argv: list[str], steps: int, log: Path, stop_timeout: float = 600) -> dict:
    """The driver with ``argv`` (train.py's): seconds to its first step, peak memory up to
    step ``steps``, then a SIGINT and the wait for its exit (it saves last.pt)."""
    command = [sys.executable, "-c", DRIVER, str(steps), *argv]
    lines: queue.Queue[str | None] = queue.Queue()
    with open(log, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)

        def read() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        memory = TreeMemory(proc.pid)
        first = last = None
        try:
            while last is None:
                memory.sample()
                try:
                    line = lines.get(timeout=SAMPLE_EVERY)
                except queue.Empty:
                    continue
                if line is None:
                    proc.wait()
                    raise SystemExit(f"training ended (exit {proc.returncode}) before step {steps}: "
                                     f"{' '.join(command[3:])}\n{tail(log)}")
                fields = line.split()
                if fields[:1] == ["STEP"]:
                    n, seconds, step = int(fields[1]), float(fields[2]), int(fields[3])
                    if n == 1:
                        first = {"seconds": seconds, "wall_seconds": time.perf_counter() - start, "step": step}
                    if n == steps:
                        last = {"seconds": seconds, "step": step}
            stop = time.perf_counter()
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=stop_timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)
    if rc != 130:
        raise SystemExit(f"training exited with {rc} after its SIGINT, not 130: {' '.join(command[3:])}\n{tail(log)}")
    return {"first_step_s": first["seconds"], "first_step_wall_s": first["wall_seconds"],
            "first_step": first["step"], "last_step": last["step"],
            "s_per_step": (last["seconds"] - first["seconds"]) / max(steps - 1, 1),
            "stop_s": time.perf_counter() - stop, **memory.figures()}


# ----------------------------------------------------------------------------- report


def verdicts(results: dict[int, dict]) -> list[tuple[str, bool]]:
    """(text, met) for each target, the smallest and largest size standing in for 29k and 5M."""
    sizes = sorted(results)
    small, large = sizes[0], sizes[-1]
    out = []
    instead = f" (measured at {large:,} pairs; the target is for 5,000,000)" if large != 5_000_000 else ""
    if len(sizes) > 1:
        grow = results[large]["train"]["peak_rss_mib"] - results[small]["train"]["peak_rss_mib"]
        grow_anon = results[large]["train"]["peak_anon_mib"] - results[small]["train"]["peak_anon_mib"]
        against = "" if (small, large) == (MULTI30K_TRAIN, 5_000_000) else \
            f" (measured at {large:,} against {small:,} pairs; the target is for 5,000,000 against 29,000)"
        out.append((f"training's peak RSS at {large:,} pairs - at {small:,}: {grow:+.0f} MiB (RssAnon {grow_anon:+.0f} "
                    f"MiB); target <= {TARGET_MEMORY_MIB} MiB{against}", grow <= TARGET_MEMORY_MIB))
    fresh, resumed = results[large]["train"]["first_step_s"], results[large]["resume"]["first_step_s"]
    out.append((f"start to first step on the prepared {large:,}-pair corpus: {fresh:.1f} s, resumed {resumed:.1f} s; "
                f"target <= {TARGET_FIRST_STEP_S:.0f} s{instead}", max(fresh, resumed) <= TARGET_FIRST_STEP_S))
    rate = results[large]["prepare"]["pairs_per_s"]
    out.append((f"prepare of {large:,} pairs: {rate:,.0f} pairs/s; target >= {TARGET_PAIRS_PER_S:,}{instead}",
                rate >= TARGET_PAIRS_PER_S))
    return out


def print_table(results: dict[int, dict], steps: int) -> None:
    print(f"\n{'':>9} | {'prepare':^34} | {f'train, {steps} steps':^23} | {f'resume, {steps} more':^23}".rstrip())
    print(f"{'pairs':>9} | {'s':>6} {'pairs/s':>8} {'peak MiB':>9} {'B/token':>8} | "
          f"{'1st s':>6} {'RSS MiB':>8} {'anon':>7} | {'1st s':>6} {'RSS MiB':>8} {'anon':>7}")
    for pairs in sorted(results):
        p, t, r = (results[pairs][k] for k in ("prepare", "train", "resume"))
        runs = [f"{x['first_step_s']:6.2f} {x['peak_rss_mib']:8.0f} {x['peak_anon_mib']:7.0f}" for x in (t, r)]
        print(f"{pairs:>9,} | {p['seconds']:6.1f} {p['pairs_per_s']:8.0f} {p['peak_rss_mib']:9.0f} "
              f"{p['bytes_per_token']:8.2f} | {runs[0]} | {runs[1]}")
    print("(s: wall seconds of the prepare; 1st s: start to the end of the first step; MiB: peaks of the process "
          "tree, VmRSS and RssAnon)")


def cleanup(workdir: Path, name: str) -> None:
    """Remove ``name`` in ``workdir`` and what a prepare leaves beside it (lock, temporary folders)."""
    target = workdir / name
    shutil.rmtree(target, ignore_errors=True)
    (workdir / f".{name}.lock").unlink(missing_ok=True)
    for stale in workdir.glob(f".{name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="29000,1000000,5000000", help="corpus sizes in pairs, comma-separated")
    parser.add_argument("--steps", type=int, default=200, help="training steps measured, and again after the resume")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/prepare-bench"),
                        help="where the corpora (kept), prepared folders and runs go")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "multi30k",
                        help="Multi30k's folder (train.{de,en}.gz, val.{de,en}.gz)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "multi30k.yaml")
    parser.add_argument("--keep", action="store_true", help="keep the prepared folders and the runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the training runs (train.py's --set), repeatable")
    args = parser.parse_args()
    try:
        sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes: comma-separated numbers of pairs, got {args.sizes!r}")
    if not sizes or sizes[0] < 1 or args.steps < 1:
        parser.error("--sizes and --steps must be positive")
    workdir, config, data_dir = args.workdir.resolve(), args.config.resolve(), args.data_dir.resolve()
    valid = (data_dir / "val.de.gz", data_dir / "val.en.gz")
    for path in (config, *valid):
        if not path.is_file():
            parser.error(f"{path}: not found")

    describe(peaks=False)
    print(f"config {config}{''.join(f' --set {o}' for o in args.set)}; {args.steps} training steps; "
          f"workdir {workdir}", flush=True)
    corpora = {n: make_corpus(data_dir, workdir / "corpora", n) for n in sizes}
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    results: dict[int, dict] = {}
    for n in sizes:
        prepared, run = workdir / f"prepared-{n}", workdir / f"run-{n}"
        cleanup(workdir, run.name)
        r = results[n] = {}
        r["prepare"] = p = measure_prepare(config, corpora[n], valid, prepared, logs / f"prepare-{n}.log")
        print(f"{n:,} pairs: prepare {p['seconds']:.1f} s (build {p['build_seconds']:.1f} s), "
              f"{p['pairs_per_s']:,.0f} pairs/s, peak {p['peak_rss_mib']:.0f} MiB RSS ({p['peak_anon_mib']:.0f} anon, "
              f"{plural(p['processes'], 'process')}), {p['disk_bytes'] / 2**20:.1f} MiB on disk, "
              f"{p['bytes_per_token']:.2f} B/token; {p['train']['pairs']:,} training pairs kept", flush=True)
        train_argv = ["--config", str(config),
                      "--set", f"data.train={json.dumps([str(p) for p in corpora[n]])}",
                      "--set", f"data.valid={json.dumps([str(p) for p in valid])}",
                      "--set", f"data.prepared={prepared}", "--set", f"train.run_dir={run}",
                      "--set", "train.eval_every=1000000000", *(x for o in args.set for x in ("--set", o))]
        for kind, argv in (("train", train_argv), ("resume", ["--resume", str(run)])):
            r[kind] = t = measure_training(argv, args.steps, logs / f"{kind}-{n}.log")
            print(f"{n:,} pairs: {kind}: first step (step {t['first_step']}) at {t['first_step_s']:.2f} s, "
                  f"{t['s_per_step']:.2f} s/step after it, peak {t['peak_rss_mib']:.0f} MiB RSS "
                  f"({t['peak_anon_mib']:.0f} anon, {plural(t['processes'], 'process')}) to step {t['last_step']}; "
                  f"stopped and saved in {t['stop_s']:.1f} s", flush=True)
        if not args.keep:
            cleanup(workdir, prepared.name)
            cleanup(workdir, run.name)
            for kind in ("prepare", "train", "resume"):
                (logs / f"{kind}-{n}.log").unlink(missing_ok=True)

    print_table(results, args.steps)
    print()
    checks = verdicts(results)
    for text, met in checks:
        print(f"{'met   ' if met else 'MISSED'} {text}")
    if args.json is not None:
        figures = {"cpu": cpu_model(), "cpus": os.cpu_count(), "config": str(config), "steps": args.steps,
                   "sizes": {str(n): results[n] for n in sizes},
                   "targets": [{"text": text, "met": met} for text, met in checks]}
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    if not args.keep and not any(logs.iterdir()):
        logs.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
