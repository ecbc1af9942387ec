"""Decoding speed: the reference's way against batched, cached greedy and beam search.

    python benchmarks/translate_speed.py --checkpoint RUN/best.pt [--data-dir data/multi30k]

Decodes test_2016_flickr (1,000 sentences) in one process:
  1. the reference's way: one sentence after another, no cache (the whole prefix is
     run through the decoder at every step), greedy, stopping at </s>;
  2. batched, cached greedy (--workers batches at once, translate.py's default unless
     given);
  3. batched, cached beam search (--beam-size, default 5, with the checkpoint's length
     penalty unless --length-penalty is given);
  4. and 5. the same two with the weights in bf16 (--dtypes fp32,bf16 by default).
For each it prints wall seconds, sentences/s, target tokens/s (generated tokens,
</s> included), the speed-up over the reference's way (in float32, as the article
decodes) and sacreBLEU; and how many batched greedy outputs are identical to the
reference's way.

The run goes in --repeat rounds (default 5). A round decodes one part of the
sentences (a fifth by default) the reference's way, then all of them once with each
batched decoder. The reference's time is the sum over its parts (every sentence once);
a batched decoder's is the median of its passes, every pass's seconds printed too.
Interleaved so, both sides of each ratio see the same moments of a shared machine.
With the reference's minute in one piece before all the 2-10 s passes, nine runs had
given greedy 25x to 37x, the reference's minute moving most (66 s in one run, 81 s in
another) while the batched passes stayed within a few percent.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe  # noqa: E402

from transformer.data.files import read_lines  # noqa: E402
from transformer.data.multi30k import resolve_data_dir  # noqa: E402
from transformer.fast.memory import keep_freed_memory  # noqa: E402
from transformer.inference.scoring import score  # noqa: E402
from transformer.inference.translator import Translator, decoding_name  # noqa: E402


def timed(translator: Translator, sources: list[list[int]]) -> tuple[float, list[list[int]], int]:
    start = time.perf_counter()
    found = translator.search(sources, nbest=1, scores=False)
    seconds = time.perf_counter() - start
    ids = [hyps[0].tokens for hyps in found]
    generated = sum(h[0].length for h in found)  # tokens, </s> included where emitted
    return seconds, ids, generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--length-penalty", type=float, default=None)
    parser.add_argument("--limit", type=int, default=None, help="decode only the first N test sentences")
    parser.add_argument("--dtypes", default="fp32,bf16", help="weight types for the batched decoders, comma-separated")
    parser.add_argument("--batch-size", type=int, default=None, help="sentences per batch (default: the checkpoint's)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="source tokens per batch (default: the checkpoint's)")
    parser.add_argument("--workers", type=int, default=None, help="batches decoded at once (default: translate.py's)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="rounds: parts of the reference's way, and passes of each batched decoder (median)")
    args = parser.parse_args()
    keep_freed_memory(one_arena=True)  # as translate.py does

    data = resolve_data_dir(args.data_dir)
    src = read_lines(data / "test_2016_flickr.de.gz")[: args.limit]
    ref = read_lines(data / "test_2016_flickr.en.gz")[: args.limit]
    sizes = {k: v for k, v in (("batch_size", args.batch_size), ("batch_tokens", args.batch_tokens),
                               ("workers", args.workers)) if v is not None}
    base = Translator.from_checkpoint(args.checkpoint, device=args.device, **sizes)
    sources = base.encode(src)
    alpha = base.cfg.length_penalty if args.length_penalty is None else args.length_penalty
    # The reference's way decodes one sentence after another, on all the threads.
    reference = dataclasses.replace(base.cfg, beam_size=1, batch_size=1, cache=False, workers=1)
    setups = [("reference (1 sentence, no cache)", reference)]
    for dtype in args.dtypes.split(","):
        setups += [
            (f"batched greedy, {dtype}", dataclasses.replace(base.cfg, beam_size=1, dtype=dtype)),
            (f"batched beam {args.beam_size}, {dtype}",
             dataclasses.replace(base.cfg, beam_size=args.beam_size, length_penalty=alpha, dtype=dtype)),
        ]
    describe(args.device)
    print(f"device {args.device}; {len(src)} sentences; {args.checkpoint}")
    print(f"{'decoding':<34} {'seconds':>8} {'sent/s':>8} {'tok/s':>8} {'speed-up':>9} {'BLEU':>6}  settings")
    translators = [(name, cfg, Translator(base.model, base.tokenizer, cfg, base.device)) for name, cfg in setups]
    rounds = max(1, args.repeat)
    passes: dict[str, list[tuple[float, list[list[int]], int]]] = {name: [] for name, _ in setups}
    for r in range(rounds):
        for n, (name, _, t) in enumerate(translators):
            # Round r decodes part r of the sentences the reference's way (the first
            # setup), and all of them with each of the others.
            part = sources[r * len(sources) // rounds : (r + 1) * len(sources) // rounds] if n == 0 else sources
            passes[name].append(timed(t, part))
    results, reference_seconds = {}, 0.0
    for n, (name, cfg, t) in enumerate(translators):
        if n == 0:  # the reference's way: its parts add up to one pass
            parts = passes[name]
            seconds, ids, generated = sum(p[0] for p in parts), [i for p in parts for i in p[1]], sum(p[2] for p in parts)
            reference_seconds = seconds
        else:
            seconds, ids, generated = sorted(passes[name], key=lambda p: p[0])[len(passes[name]) // 2]
        results[name] = ids
        bleu = score([t.detokenize(i) for i in ids], ref).bleu
        print(f"{name:<34} {seconds:8.1f} {len(src) / seconds:8.1f} {generated / seconds:8.0f} "
              f"{reference_seconds / seconds:8.1f}x {bleu:6.2f}  "
              f"{decoding_name(cfg)}, batch {cfg.batch_size} sentences / {cfg.batch_tokens} tokens, "
              f"{t.workers} worker(s), {cfg.dtype or 'fp32'}; "
              + ("parts " if n == 0 else "passes ")
              + ", ".join(f"{p[0]:.2f}" for p in passes[name]) + " s")
    first = results[setups[0][0]]
    for name, _ in setups[1:]:
        if "greedy" in name:
            same = sum(a == b for a, b in zip(first, results[name]))
            print(f"{name} == reference way: {same} of {len(first)} sentences identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
