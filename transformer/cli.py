"""Command-line entry points (``train.py`` and ``translate.py`` at the top call these)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformer.config import ConfigError, check_nbest

# Nothing here imports torch at the top: worker processes started with "spawn" (the corpus
# encoders) import the main module again, and a console script's main module imports this one.

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "multi30k.yaml"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# What may change when a run is resumed: how long and how it goes on, not what it is.
RESUMABLE = ("train.", "decode.", "data.dir", "data.workers", "data.prepared", "data.prepare_workers")
FIXED_ON_RESUME = ("train.seed", "train.run_dir", "train.runs_root", "train.best_metric")


def _config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """--config, --set and --data-dir: the options of every command that reads a config."""
    parser.add_argument(
        "--config", type=Path, default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name} from configs/)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override one config field, e.g. --set {example} (repeatable)",
    )
    parser.add_argument("--data-dir", help="folder holding the Multi30k files (same as --set data.dir=...)")


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train an Annotated Transformer model.")
    _config_arguments(parser, example="train.warmup=400")
    parser.add_argument(
        "--resume", type=Path, metavar="RUN_DIR",
        help="continue the run in RUN_DIR exactly where its last.pt left it (--set may change train.* and decode.*)",
    )
    parser.add_argument(
        "--init-from", type=Path, metavar="CKPT",
        help="fine-tune: start from this checkpoint's weights, tokenizer and vocabulary (e.g. with configs/finetune.yaml)",
    )
    args = parser.parse_args(argv)
    if args.resume is not None and args.init_from is not None:
        parser.error("--resume and --init-from exclude each other")
    if args.resume is not None and args.config is not None:
        parser.error("--resume takes the run's own config; use --set to change train.* or decode.* fields")

    from transformer.config import load_config
    from transformer.data.files import DataError
    from transformer.fast.memory import set_up_training_memory
    from transformer.training.checkpoint import CheckpointError
    from transformer.training.run import finetune_config, resume_state, run_training

    set_up_training_memory()  # before the first tensor: torch reads its huge-pages setting once
    path = args.config if args.config is not None else DEFAULT_CONFIG
    overrides = list(args.overrides)
    if args.data_dir is not None:
        overrides.append(f"data.dir={args.data_dir}")
    try:
        if args.resume is not None:
            for text in overrides:
                key = text.partition("=")[0].strip()
                if not key.startswith(RESUMABLE) or key in FIXED_ON_RESUME:
                    raise ConfigError(f"--set {text}: '{key}' cannot change when resuming a run")
            state = resume_state(args.resume)
            cfg = load_config(None, overrides, base=state["config"])
            result = run_training(cfg, resume=(args.resume, state))
        elif args.init_from is not None:
            cfg, _ = finetune_config(path, overrides, args.init_from)
            result = run_training(cfg, name=path.stem)
        else:
            cfg = load_config(path, overrides)
            result = run_training(cfg, name=path.stem)
    except (ConfigError, CheckpointError, DataError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("interrupted", file=sys.stderr)
        return 130
    if not result.main:
        # Under torchrun, rank 0 reports for the run; the others end cleanly (0), since a
        # failing process has torchrun kill the rest, rank 0 maybe before its last words.
        return 0
    print(result.run_dir)
    if result.interrupted is not None:
        print(f"stopped early; continue with: python train.py --resume {result.run_dir}", file=sys.stderr)
        return 128 + result.interrupted
    return 0


def prepare_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Prepare a corpus for training: learn the tokenizer and encode every split into memory-mapped "
        "token-id files (train.py does this itself on first use; this command does it ahead, with progress bars).",
    )
    _config_arguments(parser, example="data.prepared=DIR")
    parser.add_argument("--force", action="store_true", help="rebuild even when the prepared corpus is up to date")
    args = parser.parse_args(argv)

    from transformer.config import load_config
    from transformer.data.files import DataError
    from transformer.data.prepare import ensure_prepared
    from transformer.runtime import setup_logging
    from transformer.tasks.translation import corpus_files

    setup_logging()
    overrides = list(args.overrides)
    if args.data_dir is not None:
        overrides.append(f"data.dir={args.data_dir}")
    try:
        cfg = load_config(args.config if args.config is not None else DEFAULT_CONFIG, overrides)
        if cfg.data.task != "translation":
            raise ConfigError(f"'data.task' is {cfg.data.task!r}: only a translation corpus is prepared")
        files = corpus_files(cfg.data)
        corpus = ensure_prepared(cfg.data, files, progress=True, force=args.force)
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted; nothing half-written is left to be taken for a prepared corpus", file=sys.stderr)
        return 130
    manifest = corpus.manifest
    disk = sum(manifest["files"].values())
    tokens = sum(s["src_tokens"] + s["tgt_tokens"] for s in manifest["splits"].values())
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['pairs']} pairs, {split['src_tokens']} source and {split['tgt_tokens']} target tokens",
              file=sys.stderr)
    print(f"{disk / 2**20:.1f} MiB on disk, {disk / max(tokens, 1):.2f} bytes per token", file=sys.stderr)
    print(corpus.folder)
    return 0


NBEST_FORMAT = "LINE<TAB>RANK<TAB>SCORE<TAB>TRANSLATION"


def translate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Translate sentences with a trained checkpoint, or with a model exported to CTranslate2.",
        epilog=f"With --nbest N, each input line gives N output lines {NBEST_FORMAT}: the input's line number "
        "(from 1), the rank (1 = best), the score (log-probability / length penalty) and the text.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--checkpoint", help="a .pt file written by train.py (or a folder written by python -m transformer.export)"
    )
    model.add_argument("--model", metavar="DIR", help="a folder written by python -m transformer.export (CTranslate2)")
    parser.add_argument(
        "--engine", choices=["torch", "ctranslate2"],
        help="what decodes: this package's decoder (torch) or CTranslate2 (pip install -e \".[export]\"); with "
        "--checkpoint CKPT.pt and ctranslate2, the checkpoint is exported to a temporary folder first "
        "(default: ctranslate2 for an exported folder, else torch)",
    )
    parser.add_argument("sentences", nargs="*", help="sentences to translate (default: --input, else stdin)")
    parser.add_argument("--input", help="file with one sentence per line (plain or .gz)")
    parser.add_argument("--output", help="write translations here instead of stdout")
    parser.add_argument("--reference", help="reference translations (one per line): print BLEU and chrF to stderr")
    parser.add_argument("--beam-size", type=int, help="beams per sentence; 1 = greedy (default: the checkpoint's)")
    parser.add_argument(
        "--length-penalty", type=float, metavar="ALPHA",
        help="GNMT length penalty: rank by log-prob / ((5 + length) / 6) ** ALPHA (default: the checkpoint's)",
    )
    parser.add_argument(
        "--max-len", type=float, nargs=2, metavar=("A", "B"),
        help="generate at most A * source_length + B tokens (default: the checkpoint's)",
    )
    parser.add_argument("--nbest", type=int, default=1, help=f"print N hypotheses per line as {NBEST_FORMAT}")
    parser.add_argument("--batch-size", type=int, help="sentences decoded together, at most")
    parser.add_argument("--batch-tokens", type=int, help="source tokens decoded together, at most")
    parser.add_argument(
        "--batch-hypotheses", type=int,
        help="with beam search, hypotheses (sentences x beam size) decoded together, at most (default: 640 on a CPU)",
    )
    parser.add_argument(
        "--patience", type=float, metavar="P",
        help="beam search stops a sentence once its best extension has ended and it has round(beam size x P) "
        "finished hypotheses, CTranslate2's rule: usually faster (default: the checkpoint's decode.patience, "
        "else ours: until no live prefix can win; ctranslate2: 1)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--workers", type=int,
        help="batches decoded at once, each on its share of the CPU threads (same outputs; default: 2 on a CPU "
        "with two threads or more)",
    )
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16", "int8"],
        help="decode with the weights cast to this type (default: the checkpoint's decode.dtype, else fp32; "
        "ctranslate2: the exported weights' type); bf16 is faster on CPUs with bf16 units, fp16 needs CUDA, "
        "int8 needs --engine ctranslate2",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute the whole prefix at every step (the reference's way)"
    )
    parser.add_argument(
        "--plot-attention", metavar="DIR", type=Path,
        help="write the attention maps of each sentence to DIR as LINE-{encoder,decoder_self,encoder_decoder}.png",
    )
    args = parser.parse_args(argv)
    for flag in ("beam_size", "nbest", "batch_size", "batch_tokens", "batch_hypotheses", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.patience is not None and not args.patience > 0:
        parser.error("--patience must be positive")

    from transformer.inference.ctranslate2 import is_exported_model

    path = args.model or args.checkpoint
    exported = is_exported_model(path)
    engine = args.engine or ("ctranslate2" if args.model or exported else "torch")
    if engine == "torch" and (args.model or exported):
        parser.error(f"{path} is a model exported to CTranslate2: it runs with --engine ctranslate2 only "
                     "(give its checkpoint for the torch engine)")
    if args.model and not exported:
        return _fail(f"{path}: not a folder written by python -m transformer.export (no transformer.json)")
    if engine == "torch" and args.dtype == "int8":
        parser.error("--dtype int8 needs --engine ctranslate2")
    if engine == "ctranslate2":
        for flag, given in (("--no-cache", args.no_cache), ("--plot-attention", args.plot_attention)):
            if given:
                parser.error(f"{flag} needs the torch engine (this package's decoder)")

    import tempfile

    from transformer.data.files import DataError, iter_lines, read_lines
    from transformer.fast.memory import keep_freed_memory
    from transformer.inference.scoring import score
    from transformer.training.checkpoint import CheckpointError
    from transformer.runtime import resolve_device, setup_logging

    setup_logging()
    keep_freed_memory(one_arena=True)  # decoding worker threads share the main arena
    overrides = {"cache": not args.no_cache}
    for flag in ("beam_size", "length_penalty", "batch_size", "batch_tokens", "batch_hypotheses", "dtype", "workers",
                 "patience"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.max_len is not None:
        overrides["max_len_a"], overrides["max_len_b"] = args.max_len
    scratch = None  # a checkpoint exported on the fly for --engine ctranslate2
    try:
        if args.plot_attention is not None:
            from transformer.figures.drawing import require_matplotlib

            require_matplotlib()
        resolve_device(args.device, "--device")  # checked before anything is loaded
        if engine == "ctranslate2":
            from transformer.inference.ctranslate2 import CTranslate2Translator

            if not exported:
                from transformer.export.converter import ExportError, export_checkpoint

                scratch = tempfile.TemporaryDirectory(prefix="ctranslate2-")
                try:
                    path = export_checkpoint(path, Path(scratch.name) / "model")
                except ExportError as e:
                    return _fail(str(e))
            compute_type = overrides.pop("dtype", None)
            translator = CTranslate2Translator.from_directory(path, device=args.device, compute_type=compute_type,
                                                              **overrides)
        else:
            from transformer.inference.translator import Translator

            translator = Translator.from_checkpoint(args.checkpoint, device=args.device, **overrides)
        try:
            check_nbest(args.nbest, translator.cfg.beam_size, translator.cfg.patience)
        except ConfigError as e:
            return _fail(f"--nbest: {e}; set --beam-size")
        if args.sentences:
            lines = iter(args.sentences)
        elif args.input:
            lines = iter_lines(Path(args.input))
        else:
            lines = iter_lines(sys.stdin.buffer, "<stdin>")
        references = None
        if args.reference:
            # Scoring needs every line anyway: read the input first, so that a count
            # mismatch is reported before any decoding.
            references, lines = read_lines(Path(args.reference)), list(lines)
            if len(references) != len(lines):
                raise DataError(f"{args.reference}: {len(references)} references for {len(lines)} input lines")
        interactive = not args.sentences and not args.input and sys.stdin.isatty()
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            best = _translate_stream(translator, lines, out, args, chunk=1 if interactive else 2000)
        finally:
            if out is not sys.stdout:
                out.close()
    except (ConfigError, CheckpointError, DataError, ValueError, ImportError, OSError) as e:
        return _fail(str(e))
    finally:
        if scratch is not None:
            scratch.cleanup()
    if references is not None:
        print(score(best, references).summary(), file=sys.stderr)
    return 0


def _translate_stream(translator, lines, out, args, chunk: int) -> list[str]:
    """Translate ``lines`` ``chunk`` at a time (batches are sorted within a chunk), writing
    each chunk's output in input order as soon as it is done; returns the best outputs."""
    from itertools import islice

    from transformer.figures.attention import plot_sentence

    best: list[str] = []
    first = 1
    lines = iter(lines)
    while block := list(islice(lines, chunk)):
        sources = translator.encode(block, first)
        found = translator.search(sources, nbest=args.nbest, scores=args.nbest > 1)
        for n, (src, hyps) in enumerate(zip(sources, found), first):
            texts = [translator.detokenize(h.tokens) for h in hyps]
            best.append(texts[0])
            if args.nbest > 1:
                out.writelines(f"{n}\t{rank}\t{h.score:.4f}\t{t}\n" for rank, (h, t) in enumerate(zip(hyps, texts), 1))
            else:
                out.write(texts[0] + "\n")
            if args.plot_attention is not None and src:
                plot_sentence(translator.model, translator.tokenizer, src, hyps[0].tokens, args.plot_attention, f"{n:05d}")
        out.flush()
        first += len(block)
    return best
