"""Decoding speed: the reference's way against batched, cached greedy and beam search.

    python benchmarks/translate_speed.py --checkpoint RUN/best.pt [--data-dir data/multi30k]

Decodes test_2016_flickr (1,000 sentences), each decoder in a process of its own, as
translate.py runs one:
  1. the reference's way: one sentence after another, no cache (the whole prefix is
     run through the decoder at every step), greedy, stopping at </s>;
  2. batched, cached greedy (--workers batches at once, translate.py's default unless
     given);
  3. batched, cached beam search (--beam-size, default 5, with the checkpoint's length
     penalty unless --length-penalty is given);
  4. batched, cached beam search stopping by CTranslate2's rule (--patience, default 1:
     decode.patience, translate.py --patience);
  5. to 7. the same three with the weights in bf16 (--dtypes fp32,bf16 by default);
     with --unpacked, greedy and beam in each dtype once more with the model's linear
     layers as they are (translate.py packs their weights for oneDNN on the CPU,
     transformer.fast.packed).
  8. the checkpoint exported to CTranslate2 (python -m transformer.export), decoded by its
     engine greedily and with the same beam, in float32 and int8 (--ctranslate2; bf16
     where CTranslate2 computes in bf16 on this CPU), with --ct2-workers inter-threads
     of threads/workers intra-threads each (2 x 1 on 2 cores), as translate.py --model
     runs it, and beam search in float32 once more collecting twice as many finished
     hypotheses (patience 2). Skipped, saying so, when ctranslate2 is not installed.
For each it prints wall seconds, sentences/s, target tokens/s (generated tokens,
</s> included), the speed-up over the reference's way (in float32, as the article
decodes) and sacreBLEU; how many batched greedy outputs are identical to the
reference's way, how many CTranslate2 outputs are identical to our fp32 decoder's,
and how our decoder's time compares with CTranslate2 float32's on the same weights.

The run goes in --repeat rounds (default 5). A round decodes one part of the
sentences (a fifth by default) the reference's way, then all of them once with each
batched decoder. The reference's time is the sum over its parts (every sentence once);
a batched decoder's is the median of its passes, every pass's seconds printed too.
Before the rounds each batched decoder makes --warmup passes (default 1), one decoder
after another, that count nowhere: a decoder's first pass took 1.4-1.6x its later ones
(oneDNN builds its kernels for the batches' shapes, the heap grows), ours and
CTranslate2's alike, and with five rounds that one slow pass moved the medians.
Interleaved so, both sides of each ratio see the same moments of a shared machine; a
decoder's process waits on a pipe, idle, while the others decode. In one process
together, the translators slowed each other: our fp32 greedy pass took 1.28-1.37 s
beside our beam and bf16 translators against 0.97 s alone (oneDNN keeps the kernels of
its last 1,024 product shapes, and the others' evicted ours; malloc's arena is shared).
With the reference's minute in one piece before all the 2-10 s passes, nine runs had
given greedy 25x to 37x, the reference's minute moving most (66 s in one run, 81 s in
another) while the batched passes stayed within a few percent.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe  # noqa: E402

from transformer.data.files import read_lines  # noqa: E402
from transformer.data.multi30k import resolve_data_dir  # noqa: E402
from transformer.fast.memory import keep_freed_memory  # noqa: E402
from transformer.fast.packed import PackedLinear  # noqa: E402
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
    parser.add_argument("--batch-hypotheses", type=int, default=None,
                        help="beam search's hypotheses per batch (default: the checkpoint's, 640 on a CPU)")
    parser.add_argument("--workers", type=int, default=None, help="batches decoded at once (default: translate.py's)")
    parser.add_argument("--patience", type=float, default=1.0,
                        help="also beam search stopping by CTranslate2's rule with this patience (default 1; 0: not)")
    parser.add_argument("--unpacked", action="store_true",
                        help="also decode with the linear layers unpacked (nn.Linear's product), for comparison")
    parser.add_argument("--repeat", type=int, default=5,
                        help="rounds: parts of the reference's way, and passes of each batched decoder (median)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="passes of each batched decoder before the rounds, not timed (default 1)")
    parser.add_argument("--ctranslate2", default="auto",
                        help="CTranslate2 weight types to export and decode, comma-separated (float32, int8, "
                        "int8_float32, bf16), 'none' for no CTranslate2 rows (default 'auto': float32 and int8, "
                        "and bf16 where CTranslate2 computes in bf16 on this CPU)")
    parser.add_argument("--ct2-workers", type=int, default=2,
                        help="CTranslate2 inter-threads, each with threads/workers intra-threads (default 2)")
    args = parser.parse_args()
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    keep_freed_memory(one_arena=True)  # as translate.py does

    data = resolve_data_dir(args.data_dir)
    src = read_lines(data / "test_2016_flickr.de.gz")[: args.limit]
    ref = read_lines(data / "test_2016_flickr.en.gz")[: args.limit]
    sizes = {k: v for k, v in (("batch_size", args.batch_size), ("batch_tokens", args.batch_tokens),
                               ("batch_hypotheses", args.batch_hypotheses), ("workers", args.workers))
             if v is not None}
    base = Translator.from_checkpoint(args.checkpoint, device=args.device, packed=False, **sizes)
    sources = base.encode(src)
    alpha = base.cfg.length_penalty if args.length_penalty is None else args.length_penalty
    # The reference's way decodes one sentence after another, on all the threads.
    reference = dataclasses.replace(base.cfg, beam_size=1, batch_size=1, cache=False, workers=1)
    setups = [("reference (1 sentence, no cache)", reference, False)]
    for packed in (True, False) if args.unpacked else (True,):
        for dtype in args.dtypes.split(","):
            how = f"{dtype}" if packed else f"{dtype}, unpacked"
            beam = dataclasses.replace(base.cfg, beam_size=args.beam_size, length_penalty=alpha, dtype=dtype,
                                       patience=None)
            setups += [
                (f"batched greedy, {how}", dataclasses.replace(base.cfg, beam_size=1, dtype=dtype), packed),
                (f"batched beam {args.beam_size}, {how}", beam, packed),
            ]
            if args.patience > 0:
                setups.append((f"batched beam {args.beam_size}, {how}, patience {args.patience:g}",
                               dataclasses.replace(beam, patience=args.patience), packed))
    describe(args.device)
    print(f"device {args.device}; {len(src)} sentences; {args.checkpoint}")
    scratch = tempfile.TemporaryDirectory(prefix="translate-speed-")
    specs = [(name, ("torch", args.checkpoint, args.device, cfg, packed)) for name, cfg, packed in setups]
    specs += ctranslate2_setups(args, sizes, alpha, Path(scratch.name))
    context = multiprocessing.get_context("spawn")
    pipes = []
    for _, spec in specs:
        mine, theirs = context.Pipe()
        context.Process(target=decoder_process, args=(theirs, spec, sources), daemon=True).start()
        theirs.close()  # the child's end: a child that dies then ends our recv with EOFError
        pipes.append(mine)
    decoders = [(name, pipe, pipe.recv()) for (name, _), pipe in zip(specs, pipes)]  # with its settings in words
    print(f"{'decoding':<34} {'seconds':>8} {'sent/s':>8} {'tok/s':>8} {'speed-up':>9} {'BLEU':>6}  settings")
    for _, pipe, _ in decoders[1:]:  # the reference's way: its parts are one pass in all
        for _ in range(args.warmup):
            pipe.send((0, len(sources)))
            pipe.recv()
    rounds = max(1, args.repeat)
    passes: dict[str, list[tuple[float, list[list[int]], int]]] = {name: [] for name, _, _ in decoders}
    for r in range(rounds):
        for n, (name, pipe, _) in enumerate(decoders):
            # Round r decodes part r of the sentences the reference's way (the first
            # setup), and all of them with each of the others.
            part = (r * len(sources) // rounds, (r + 1) * len(sources) // rounds) if n == 0 else (0, len(sources))
            pipe.send(part)
            passes[name].append(pipe.recv())
    for _, pipe, _ in decoders:
        pipe.send(None)
    results, times, reference_seconds = {}, {}, 0.0
    for n, (name, _, how) in enumerate(decoders):
        if n == 0:  # the reference's way: its parts add up to one pass
            parts = passes[name]
            seconds, ids, generated = sum(p[0] for p in parts), [i for p in parts for i in p[1]], sum(p[2] for p in parts)
            reference_seconds = seconds
        else:
            seconds, ids, generated = sorted(passes[name], key=lambda p: p[0])[len(passes[name]) // 2]
        results[name], times[name] = ids, seconds
        bleu = score([base.detokenize(i) for i in ids], ref).bleu
        print(f"{name:<34} {seconds:8.1f} {len(src) / seconds:8.1f} {generated / seconds:8.0f} "
              f"{reference_seconds / seconds:8.1f}x {bleu:6.2f}  {how}; "
              + ("parts " if n == 0 else "passes ")
              + ", ".join(f"{p[0]:.2f}" for p in passes[name]) + " s")
    first = results[setups[0][0]]
    for name, _, _ in setups[1:]:
        if "greedy" in name:
            same = sum(a == b for a, b in zip(first, results[name]))
            print(f"{name} == reference way: {same} of {len(first)} sentences identical")
    dtype = args.dtypes.split(",")[0]
    ours = {"greedy": f"batched greedy, {dtype}", "beam": f"batched beam {args.beam_size}, {dtype}"}
    patient_ours = f"{ours['beam']}, patience {args.patience:g}"
    for name, _, _ in decoders:
        if name.startswith("ctranslate2"):
            mine = ours["greedy" if "greedy" in name else "beam"]
            same = sum(a == b for a, b in zip(results[mine], results[name]))
            print(f"{name} == {mine}: {same} of {len(first)} sentences identical")
            if "beam" in name and "patience" not in name and patient_ours in results and args.patience == 1:
                same = sum(a == b for a, b in zip(results[patient_ours], results[name]))
                print(f"{name} == {patient_ours} (the same rule): {same} of {len(first)} sentences identical")
    for kind, mine in ours.items():
        engine = f"ctranslate2 {'greedy' if kind == 'greedy' else f'beam {args.beam_size}'}, float32"
        if engine not in times:
            continue
        fastest = min((n for n, _, _ in decoders[1:] if not n.startswith("ctranslate2")
                       and (("greedy" in n) == (kind == "greedy"))), key=times.get)
        patient = f"{engine}, patience 2"
        closer = (f" ({times[mine] / times[patient]:.2f}x that of {patient}, whose search is closer to ours)"
                  if patient in times else "")
        if kind == "beam" and patient_ours in times and args.patience == 1:
            closer += f"; {patient_ours} (its rule) {times[patient_ours] / times[engine]:.2f}x"
        print(f"{kind}: {mine} takes {times[mine] / times[engine]:.2f}x the time of {engine}{closer}; "
              f"our fastest ({fastest}) {times[fastest] / times[engine]:.2f}x")
    scratch.cleanup()
    return 0


def decoder_process(pipe, spec: tuple, sources: list[list[int]]) -> None:
    """One decoder in a process of its own: it sends its settings in words, then decodes
    the sentences from ``start`` to ``end`` for each ``(start, end)`` it receives,
    answering with ``timed``'s figures, until it receives None."""
    keep_freed_memory(one_arena=True)  # as translate.py does
    if spec[0] == "torch":
        _, checkpoint, device, cfg, packed = spec
        base = Translator.from_checkpoint(checkpoint, device=device, packed=False)
        t = Translator(base.model, base.tokenizer, cfg, base.device, packed=packed)
        packed = any(isinstance(m, PackedLinear) for m in t.model.modules())
        how = f"{t.workers} worker(s), {cfg.dtype or 'fp32'}{', packed' if packed else ''}"
    else:
        from transformer.inference.ctranslate2 import CTranslate2Translator

        _, exported, device, workers, sizes, decoding = spec
        t = CTranslate2Translator.from_directory(exported, device=device, workers=workers, **sizes)
        t = t.with_decoding(**decoding)
        cfg = t.cfg
        how = (f"{t.workers} worker(s) x {t.threads} thread(s), {t.compute_type} ({t.meta['quantization']} weights)"
               + (f", {t.patience:g} x beam finished" if cfg.beam_size > 1 else ""))
    pipe.send(f"{decoding_name(cfg)}, batch {t._batch_sentences()} sentences / {cfg.batch_tokens} tokens, {how}")
    while (part := pipe.recv()) is not None:
        pipe.send(timed(t, sources[part[0]:part[1]]))


def ctranslate2_setups(args, sizes: dict, alpha: float, folder: Path) -> list:
    """(name, spec for ``decoder_process``) for each weight type asked for, greedy and
    beam, the checkpoint exported into ``folder``; none, with a line saying why, without
    ctranslate2."""
    if args.ctranslate2 == "none":
        return []
    try:
        import ctranslate2
    except ImportError:
        print("no CTranslate2 rows: ctranslate2 is not installed (pip install -e \".[export]\")")
        return []
    from transformer.export.converter import export_checkpoint

    supported = ctranslate2.get_supported_compute_types(args.device)
    if args.ctranslate2 == "auto":
        types = ["float32", "int8"] + (["bf16"] if "bfloat16" in supported else [])
        if "bfloat16" not in supported:
            print(f"no CTranslate2 bf16 row: ctranslate2 {ctranslate2.__version__} computes in "
                  f"{', '.join(sorted(supported))} on this {args.device}")
    else:
        types = args.ctranslate2.split(",")
    found = []
    engine_sizes = {k: v for k, v in sizes.items() if k != "workers"}
    for quantization in types:
        exported = export_checkpoint(args.checkpoint, folder / quantization, quantization)
        spec = ("ctranslate2", exported, args.device, args.ct2_workers, engine_sizes)
        beam = {"beam_size": args.beam_size, "length_penalty": alpha}
        found += [(f"ctranslate2 greedy, {quantization}", spec + ({"beam_size": 1},)),
                  (f"ctranslate2 beam {args.beam_size}, {quantization}", spec + (beam,))]
        if quantization == "float32" and alpha != 0:
            # Searching on until beam_size · 2 hypotheses have ended: closer to our search.
            found.append((f"ctranslate2 beam {args.beam_size}, {quantization}, patience 2",
                          spec + ({**beam, "patience": 2},)))
    return found


if __name__ == "__main__":
    sys.exit(main())
