"""Serving under load: the translation server against translate.py's batched greedy speed.

    python benchmarks/serve_load.py --checkpoint RUN/best.pt [--data-dir data/multi30k] [--requests 10000]
    python benchmarks/serve_load.py --checkpoint RUN/best.pt --dtype bf16   # every side decoding in bf16

Without --checkpoint it first trains a quick model (train.py on Multi30k, --train-steps
steps of the default config, a few minutes) and says so: its translations are poor, but
both sides of every comparison decode the same model.

In one run, on test_2016_flickr's 1,000 German sentences:
  1. translate.py's batched greedy speed: the Translator as translate.py builds it (its
     batches and decoding threads), translating all the sentences at once, text to text;
     --repeat passes before the server's levels and --repeat after, the median of them all
     (a shared machine's slow minutes then weigh on both sides);
  2. the same model with no HTTP, on the sentences in random order, in two one-thread
     threads each holding half the connections of each level in flight: as a stream
     (``GreedyStream``, a new sentence joining as soon as one ends: what the server's
     decoding threads do) and in batches of that size (each ending before the next starts):
     what the server can do at most when that many requests are in flight, so that its
     own overhead shows apart from the cost of decoding few sentences at a time; and
     translate.py's way in batches of that size (sorted by length, --repeat passes): what
     translate.py itself gives when it may hold no more sentences at once than the clients
     keep in flight;
  3. the server (``python -m transformer.serve --beam-size 1``) in a subprocess, and
     clients in threads, one keep-alive HTTP connection each, sending one sentence per
     request: --per-level requests (default: every sentence once) at 1, 8 and 32
     connections; then 32 connections until --requests requests in all (default 10,000).

It prints sentences/s, p50 and p99 latency and errors per level, how many outputs differ
from translate.py's, the server's resident memory (from /proc) after it started, after
the first levels and after the last request, and the verdicts against the targets: at
32 connections at least 70% of translate.py's sentences/s, no errors, memory flat, and
a p50 under 100 ms for one client.

The clients run on the same machine and take some of its CPU: the figures are those of
the whole, as a user of a one-machine server sees them.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe  # noqa: E402

from transformer.data.files import read_lines  # noqa: E402
from transformer.data.multi30k import resolve_data_dir  # noqa: E402
from transformer.fast.memory import keep_freed_memory  # noqa: E402
from transformer.inference.translator import Translator  # noqa: E402

LEVELS = (1, 8, 32)
TARGET_SHARE = 0.70  # of translate.py's sentences/s, at 32 connections
TARGET_P50_MS = 100.0  # one client
FLAT_MIB = 32.0  # "memory flat": the RSS grows by less than this over the last requests


def train_quick_model(data: Path, steps: int) -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix="serve-load-")) / "run"
    print(f"no --checkpoint: training a quick model first (python train.py, {steps} steps of the default config, "
          f"in {run_dir}); its translations are poor, but both sides below decode the same model", flush=True)
    command = [
        sys.executable, str(ROOT / "train.py"),
        "--set", f"train.max_steps={steps}", "--set", f"train.run_dir={run_dir}",
        # Multi30k's files named as a corpus of one's own: no test-set decoding at the end.
        "--set", f"data.train=[{data / 'train.de.gz'}, {data / 'train.en.gz'}]",
        "--set", f"data.valid=[{data / 'val.de.gz'}, {data / 'val.en.gz'}]",
    ]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return run_dir / "last.pt"


class TranslatePy:
    """translate.py's greedy decoding of the sentences, timed pass by pass."""

    def __init__(self, checkpoint: str, sentences: list[str], **decode):
        self.translator = Translator.from_checkpoint(checkpoint, device="cpu", beam_size=1, **decode)
        self.sentences = sentences
        self.passes: list[float] = []
        self.outputs: list[str] = []

    def run(self, repeat: int) -> None:
        for _ in range(repeat):
            start = time.perf_counter()
            self.outputs = self.translator.translate(self.sentences)
            self.passes.append(time.perf_counter() - start)

    @property
    def per_second(self) -> float:
        """Sentences/s of the median pass."""
        return len(self.sentences) / statistics.median(self.passes)


def _no_http_speed(checkpoint: str, sentences: list[str], workers: int, decode, dtype: str | None) -> float:
    """Greedy sentences/s of ``decode(translator, part)`` in ``workers`` threads of one
    torch thread each, each on its share of the sentences in random order; the
    Translator unpacked, as the server's."""
    import random

    import torch

    translator = Translator.from_checkpoint(checkpoint, device="cpu", packed=False, beam_size=1, workers=1,
                                            **_dtype(dtype))
    sources = translator.encode(sentences)
    random.Random(0).shuffle(sources)

    def run(part: list[list[int]]) -> None:
        torch.set_num_threads(1)  # this benchmark thread's own setting
        with torch.inference_mode():
            decode(translator, part)

    threads = [threading.Thread(target=run, args=(sources[i::workers],)) for i in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(sources) / (time.perf_counter() - start)


def _dtype(dtype: str | None) -> dict:
    """The Translator's dtype override: none when not asked, so the checkpoint's stays."""
    return {} if dtype is None else {"dtype": dtype}


def stream_speed(checkpoint: str, sentences: list[str], rows: int, workers: int = 2,
                 dtype: str | None = None) -> float:
    """Each thread with a ``GreedyStream`` holding ``rows`` sentences while there are any
    left: what the server's decoding threads can give at most when ``workers * rows``
    requests are in flight."""

    def decode(translator: Translator, part: list[list[int]]) -> None:
        stream, waiting = translator.stream(), iter(enumerate(part))
        while True:
            while len(stream) < rows and (item := next(waiting, None)) is not None:
                stream.add(*item)
            if not len(stream):
                return
            stream.step()

    return _no_http_speed(checkpoint, sentences, workers, decode, dtype)


def small_batch_speed(checkpoint: str, sentences: list[str], batch: int, workers: int = 2,
                      dtype: str | None = None) -> float:
    """Each thread decoding its sentences in batches of ``batch``, one after another: the
    most static batches can give when no more than ``workers * batch`` requests are in
    flight."""

    def decode(translator: Translator, part: list[list[int]]) -> None:
        for i in range(0, len(part), batch):
            translator.search(part[i : i + batch], nbest=1, scores=False)

    return _no_http_speed(checkpoint, sentences, workers, decode, dtype)


class ServerProcess:
    """``python -m transformer.serve`` on 127.0.0.1, a free port, its output in a file."""

    def __init__(self, checkpoint: str, extra: list[str]):
        self.log = Path(tempfile.mkdtemp(prefix="serve-load-")) / "server.log"
        self.out = open(self.log, "w", encoding="utf-8")
        self.command = [sys.executable, "-m", "transformer.serve", "--checkpoint", checkpoint, "--port", "0",
                        "--beam-size", "1", "--no-access-log", *extra]
        self.proc = subprocess.Popen(self.command, stdout=self.out, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 300
        while not (found := re.search(r"at http://127\.0\.0\.1:(\d+)/", self.log.read_text(encoding="utf-8"))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{self.log.read_text(encoding='utf-8')}")
            time.sleep(0.1)
        self.port = int(found.group(1))
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not answer /health")
            time.sleep(0.1)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def health(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        finally:
            self.out.close()


@dataclass
class Level:
    connections: int
    requests: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    outputs: dict[int, str] = field(default_factory=dict)  # sentence index -> the server's translation

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    def percentile_ms(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


def run_level(port: int, sentences: list[str], connections: int, count: int, first: int = 0) -> Level:
    """``count`` requests, one sentence each (sentence ``first`` on, cycling), from
    ``connections`` threads, each with its own keep-alive connection."""
    level, numbers, lock = Level(connections), itertools.count(first), threading.Lock()
    end = first + count

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        latencies, errors, outputs = [], 0, {}
        while (n := next(numbers)) < end:
            i = n % len(sentences)
            body = json.dumps({"q": sentences[i]}).encode()
            start = time.perf_counter()
            try:
                conn.request("POST", "/translate", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                if response.status == 200:
                    outputs[i] = json.loads(data)["translatedText"]
                else:
                    errors += 1
            except (OSError, http.client.HTTPException, ValueError):
                errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            latencies.append(time.perf_counter() - start)
        conn.close()
        with lock:
            level.latencies += latencies
            level.errors += errors
            level.outputs.update(outputs)

    threads = [threading.Thread(target=client) for _ in range(connections)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    level.seconds = time.perf_counter() - start
    level.requests = count
    return level


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="the model to serve (default: train a quick one first)")
    parser.add_argument("--data-dir", default=None, help="Multi30k's folder (default: data/multi30k)")
    parser.add_argument("--requests", type=int, default=10_000, help="requests in all (default 10,000)")
    parser.add_argument("--per-level", type=int, default=None,
                        help="requests at each of 1, 8 and 32 connections (default: every test sentence once)")
    parser.add_argument("--repeat", type=int, default=3, help="passes of translate.py's way (median)")
    parser.add_argument("--train-steps", type=int, default=100, help="steps of the quick model (without --checkpoint)")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)),
                        help="concurrent connections of each level, comma-separated (default 1,8,32)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="pass ARG to the server, e.g. --server-arg=--workers=1 (repeatable)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="decode in this type on every side, translate.py's and the server's (default: the "
                             "checkpoint's decode.dtype, else fp32)")
    args = parser.parse_args()
    keep_freed_memory(one_arena=True)  # as translate.py does

    data = resolve_data_dir(args.data_dir)
    sentences = read_lines(data / "test_2016_flickr.de.gz")
    checkpoint = args.checkpoint or str(train_quick_model(data, args.train_steps))
    per_level = args.per_level or len(sentences)
    levels_asked = [int(n) for n in args.levels.split(",")]
    per_level = min(per_level, max(1, args.requests // len(levels_asked)))
    soak = max(0, args.requests - per_level * len(levels_asked))

    describe("cpu")
    print(f"{len(sentences)} sentences of test_2016_flickr; {checkpoint}")
    # Passes before the server and after it, so that a shared machine's slow minutes
    # weigh on both sides of the comparison.
    translate_py = TranslatePy(checkpoint, sentences, **_dtype(args.dtype))
    translate_py.run(args.repeat)
    reference = translate_py.outputs
    print(f"translate.py's way (batched greedy, {args.dtype or 'the checkpoint dtype'}): "
          f"{translate_py.per_second:.1f} sentences/s "
          f"(passes {', '.join(f'{p:.2f}' for p in translate_py.passes)} s)")
    ceilings, held = {}, {}
    for connections in sorted({n for n in levels_asked if n > 1}):
        rows = max(1, connections // 2)
        ceilings[connections] = stream_speed(checkpoint, sentences, rows, dtype=args.dtype)
        batches = small_batch_speed(checkpoint, sentences, rows, dtype=args.dtype)
        # translate.py itself, allowed no more sentences at once than the clients keep in
        # flight: its batches sorted by length (which a server cannot choose), packed weights.
        limited = TranslatePy(checkpoint, sentences, batch_size=rows, **_dtype(args.dtype))
        limited.run(args.repeat)
        held[connections] = limited.per_second
        print(f"{connections} in flight, no HTTP, 2 threads of {rows}: streams {ceilings[connections]:.1f} "
              f"sentences/s, batches {batches:.1f}; translate.py's way in batches of {rows} (sorted by length) "
              f"{held[connections]:.1f}")

    server = ServerProcess(checkpoint, args.server_arg + ([f"--dtype={args.dtype}"] if args.dtype else []))
    try:
        print(f"server: {' '.join(server.command[1:])} (port {server.port})")
        rss = [("started", server.rss_mib())]
        print(f"{'connections':>11} {'requests':>8} {'seconds':>8} {'sent/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'errors':>6} {'differ':>6} {'RSS MiB':>8}")
        levels, done = [], 0

        def report(level: Level, name: str) -> None:
            differ = sum(text != reference[i] for i, text in level.outputs.items())
            rss.append((name, server.rss_mib()))
            print(f"{name:>11} {level.requests:8d} {level.seconds:8.1f} {level.per_second:8.1f} "
                  f"{level.percentile_ms(50):8.1f} {level.percentile_ms(99):8.1f} {level.errors:6d} {differ:6d} "
                  f"{rss[-1][1]:8.1f}", flush=True)

        for connections in levels_asked:
            level = run_level(server.port, sentences, connections, per_level, first=done)
            done += per_level
            levels.append(level)
            report(level, str(connections))
        warm_rss = rss[-1][1]
        soaked = None
        if soak:
            soaked = run_level(server.port, sentences, levels_asked[-1], soak, first=done)
            done += soak
            report(soaked, f"{levels_asked[-1]} (rest)")
        batching = server.health()["batching"]
    finally:
        code = server.stop()
    translate_py.run(args.repeat)
    batched = translate_py.per_second
    every = ", ".join(f"{p:.2f}" for p in translate_py.passes)
    print(f"translate.py's way again: the median of all its passes ({every} s): {batched:.1f} sentences/s")
    if batching["steps"]:
        print(f"server: {batching['jobs']} requests, {batching['sentences']} sentences streamed in "
              f"{batching['steps']} steps; exit status {code} after SIGTERM")
    else:
        print(f"server: {batching['jobs']} requests in {batching['batches']} batches "
              f"({batching['sentences'] / max(1, batching['batches']):.1f} sentences per batch, at most "
              f"{batching['largest_batch']}); exit status {code} after SIGTERM")
    print("server RSS (MiB): " + ", ".join(f"{name} {mib:.1f}" for name, mib in rss))

    top = levels[-1] if soaked is None else soaked
    share = top.per_second / batched
    errors = sum(level.errors for level in levels) + (soaked.errors if soaked else 0)
    growth = rss[-1][1] - warm_rss
    one = next((level for level in levels if level.connections == 1), None)
    print("verdicts:")
    print(f"  {levels_asked[-1]} connections: {top.per_second:.1f} sentences/s = {100 * share:.0f}% of translate.py's "
          f"{batched:.1f} (target >= {100 * TARGET_SHARE:.0f}%): {'PASS' if share >= TARGET_SHARE else 'FAIL'}"
          + (f"; {100 * top.per_second / ceilings[levels_asked[-1]]:.0f}% of the streams' own speed with "
             f"that many in flight" if levels_asked[-1] in ceilings else ""))
    print(f"  errors: {errors} in {done} requests (target 0): {'PASS' if errors == 0 else 'FAIL'}")
    print(f"  memory: {rss[0][1]:.1f} MiB when started, {warm_rss:.1f} after {per_level * len(levels)} requests, "
          f"{rss[-1][1]:.1f} after {done} ({growth:+.1f} MiB over the last {done - per_level * len(levels)}; "
          f"target: flat, under {FLAT_MIB:g} MiB): {'PASS' if growth < FLAT_MIB else 'FAIL'}")
    if levels_asked[-1] in held:
        print(f"  (translate.py's way itself, holding at most {levels_asked[-1]} sentences at once: "
              f"{held[levels_asked[-1]]:.1f} sentences/s = {100 * held[levels_asked[-1]] / batched:.0f}% of its "
              f"batched speed; the server reached {100 * top.per_second / held[levels_asked[-1]]:.0f}% of that)")
    if one is not None:
        print(f"  1 connection: p50 {one.percentile_ms(50):.1f} ms (target < {TARGET_P50_MS:g} ms): "
              f"{'PASS' if one.percentile_ms(50) < TARGET_P50_MS else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
