"""The subword sampler's start as the number of distinct words grows.

    python benchmarks/sampler_start.py [--words 39493,300000,1000000] [--alpha 0.5]
        [--config configs/multi30k.yaml] [--set KEY=VALUE ...]

With ``data.sp_alpha`` above 0, every start and resume of a run builds the lattice of
each distinct word of the training split (``transformer.data.sampling.Lattices``): its
time and memory grow with the distinct words, not with the pairs. Multi30k has 39,493;
a corpus of millions of pairs has millions (compounds, names, numbers). This script
takes the config's tokenizer and training split (preparing the corpus if it is not
yet), makes ``N`` distinct words for each size (Multi30k's own, then words joined from
two of them at random, as compounds are), and for each, in a fresh process: the
seconds to build their lattices (and microseconds a word), the edges, the lattices'
bytes, the peak resident memory the build added, and the seconds to draw one
segmentation of every word once. Memory is the process's peak (``ru_maxrss``) after
the build less before it. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe

# One size, in a process of its own (argv: config, overrides, alpha, words): a JSON line.
ONE_SIZE = """
import json, resource, sys, time
import numpy as np
from transformer.config import load_config
from transformer.data.sampling import Lattices
from transformer.data.words import WordBoundaries, number_words
from transformer.tasks.translation import TranslationTask

config, overrides, alpha, n = json.loads(sys.argv[1])
task = TranslationTask(load_config(config, [*overrides, "data.sp_alpha=0"]))
types, _ = number_words(WordBoundaries(task.tokenizer), task.corpus.train)
base, words = types.words, list(types.words[:n])
seen, rng = set(words), np.random.default_rng(0)
while len(words) < n:
    for i, j in rng.integers(0, len(base), (n - len(words), 2)).tolist():
        word = base[i] + (base[j][1:] if len(base[j]) > 1 else base[j])  # the second's "\\u2581" dropped
        if word not in seen:
            seen.add(word)
            words.append(word)
words = words[:n]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
lattices = Lattices(task.tokenizer, words, alpha)
built = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
held = sum(a.nbytes for a in (lattices.start, lattices.end, lattices.first, lattices.within,
                              lattices.edge_from, lattices.edge_id))
start = time.perf_counter()
lattices.sample(np.arange(len(words)), np.uint64(1))
drawn = time.perf_counter() - start
print(json.dumps({"words": len(words), "pieces": sum(map(len, words)) / len(words), "build_s": built,
                  "edges": len(lattices.edge_id), "held_mib": held / 2**20, "peak_mib": peak / 1024,
                  "sample_s": drawn}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--words", default="39493,300000,1000000", help="distinct words per size, comma-separated")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--config", default=str(ROOT / "configs" / "multi30k.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    args = parser.parse_args()
    describe(peaks=False)
    for n in [int(w) for w in args.words.split(",")]:
        out = subprocess.run([sys.executable, "-c", ONE_SIZE, json.dumps([args.config, args.set, args.alpha, n])],
                             cwd=ROOT, capture_output=True, text=True, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode:
            sys.exit(f"{n:,} words: the run failed:\n{out.stderr}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{row['words']:>10,} words ({row['pieces']:.1f} pieces each): lattices built in "
              f"{row['build_s']:.2f} s ({1e6 * row['build_s'] / row['words']:.1f} µs a word), "
              f"{row['edges']:,} edges, {row['held_mib']:.0f} MiB kept, peak +{row['peak_mib']:.0f} MiB; "
              f"one draw of every word {row['sample_s']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
