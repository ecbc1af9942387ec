"""Building a prepared corpus (see ``transformer.data.prepared``) and finding one to reuse.

``ensure_prepared`` is what a run calls: it reuses the prepared corpus when its manifest
says it was built from the same files (same paths, sizes and modification times), data
settings and tokenizer, and otherwise builds it, saying why. Building:

1. the tokenizer, unless one is given (from a checkpoint), is learned from a seeded
   random sample of ``data.tokenizer_sample`` training pairs (all of them when the
   corpus is smaller), so its time and memory do not grow with the corpus;
2. every split is read as a stream, in chunks of lines, and encoded in worker
   processes (``data.prepare_workers``); training pairs with an empty side or more than
   ``data.max_len`` tokens are dropped and counted, validation and test pairs never;
3. everything is written into a temporary folder beside the target, the manifest last,
   and the folder is renamed into place: an interrupted prepare leaves a temporary
   folder (removed by the next one), never a corpus that looks finished.

A lock file beside the folder makes concurrent runs wait for one build instead of
racing. This module needs no torch in the worker processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformer.config import DataConfig
from transformer.data.encode import encode_split, sample_pairs
from transformer.data.files import DataError, fsync_dir
from transformer.data.prepared import (
    FORMAT, MANIFEST, PreparedCorpus, damaged, id_dtype, read_manifest, tokenizer_digest,
)
from transformer.data.tokenizers import Tokenizer, learn_tokenizer

log = logging.getLogger(__name__)

CorpusFiles = dict[str, "tuple[Path, Path] | None"]  # split -> (source file, target file)

# The data settings each tokenizer kind depends on (a change to another one keeps the corpus).
TOKENIZER_SETTINGS = {
    "sentencepiece": ("vocab_size", "sp_model_type", "tokenizer_sample"),
    "spacy": ("min_freq", "src_lang", "tgt_lang", "tokenizer_sample"),
}


def prepared_root() -> Path:
    """Where prepared corpora go unless ``data.prepared`` says: ``$TRANSFORMER_PREPARED``;
    else ``$TRANSFORMER_DATA/prepared``; else ``data/prepared`` under the project root (a
    source checkout's, else the current directory)."""
    if os.environ.get("TRANSFORMER_PREPARED"):
        return Path(os.environ["TRANSFORMER_PREPARED"]).expanduser()
    if os.environ.get("TRANSFORMER_DATA"):
        return Path(os.environ["TRANSFORMER_DATA"]).expanduser() / "prepared"
    checkout = Path(__file__).resolve().parent.parent.parent
    return (checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()) / "data" / "prepared"


def identity(cfg: DataConfig, files: CorpusFiles, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """What a prepared corpus is built from: the manifest's record, compared to reuse one.

    Raises:
        DataError: an input file is missing or unreadable.
    """
    inputs = {}
    for split, pair in files.items():
        if pair is None:
            continue
        inputs[split] = []
        for path in pair:
            try:
                stat = Path(path).stat()
            except OSError as e:
                raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
            record = {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            inputs[split].append(record)
    settings: dict[str, Any] = {"max_len": cfg.max_len}
    if tokenizer is None:
        settings["tokenizer"] = cfg.tokenizer
        settings.update({key: getattr(cfg, key) for key in TOKENIZER_SETTINGS[cfg.tokenizer]})
    learned = tokenizer is None
    digest = None if learned else tokenizer_digest(tokenizer.state_dict())
    tokenizer_record = {"learned": learned, "sha256": digest}
    return {"format": FORMAT, "inputs": inputs, "settings": settings, "tokenizer": tokenizer_record}


def mismatch(manifest: dict[str, Any], want: dict[str, Any]) -> str | None:
    """Why a prepared corpus with ``manifest`` is not the one ``want`` describes, or None."""
    if manifest.get("format") != want["format"]:
        return f"it has format {manifest.get('format')}, this version writes {want['format']}"
    have = manifest.get("inputs", {})
    for split in sorted(set(have) | set(want["inputs"])):
        old, new = have.get(split), want["inputs"].get(split)
        if old is None or new is None:
            return f"the {split} split is {'new' if old is None else 'gone'}"
        for a, b in zip(old, new):
            if a["path"] != b["path"]:
                return f"the {split} split is read from {b['path']}, not {a['path']}"
            if (a["size"], a["mtime_ns"]) != (b["size"], b["mtime_ns"]):
                return f"{b['path']} changed (size or modification time)"
    if want["tokenizer"]["learned"]:
        if not manifest.get("tokenizer", {}).get("learned"):
            return "its tokenizer came from a checkpoint; this run learns its own"
        for key, value in want["settings"].items():
            if manifest["settings"].get(key) != value:
                return f"'data.{key}' is {value!r}, it was built with {manifest['settings'].get(key)!r}"
    else:
        if manifest.get("tokenizer", {}).get("sha256") != want["tokenizer"]["sha256"]:
            return "its tokenizer is not the checkpoint's"
        built, now = manifest["settings"].get("max_len"), want["settings"]["max_len"]
        if built != now:
            return f"'data.max_len' is {now}, it was built with {built}"
    return None


def corpus_name(cfg: DataConfig, files: CorpusFiles) -> str:
    """A readable folder name for a corpus: its training file's folder and stem, the
    languages and tokenizer, and a hash of the input paths (two corpora never share a
    folder), e.g. ``multi30k.train.de-en.sentencepiece.1a2b3c4d``."""
    src = Path(files["train"][0]).resolve()
    stem = ".".join(part for part in (src.parent.name, src.name.split(".")[0]) if part) or "corpus"
    paths = "\n".join(str(Path(p).resolve()) for pair in files.values() if pair is not None for p in pair)
    digest = hashlib.sha256(paths.encode()).hexdigest()[:8]
    return f"{stem}.{cfg.src_lang}-{cfg.tgt_lang}.{cfg.tokenizer}.{digest}"


def ensure_prepared(
    cfg: DataConfig, files: CorpusFiles, tokenizer: Tokenizer | None = None, progress: bool = False,
    force: bool = False,
) -> PreparedCorpus:
    """The prepared corpus of ``files``, reused when nothing changed, else (re)built.

    Args:
        cfg: the data settings; ``data.prepared`` names the folder (default: a folder per
            corpus under ``prepared_root()``).
        files: (source, target) files of each split; test may be None.
        tokenizer: encode with this one (a checkpoint's); None: learn one.
        progress: show progress bars while building.
        force: rebuild even when the prepared corpus is up to date.

    Raises:
        DataError: an input file cannot be read, is not UTF-8 or its two sides differ in
            line count (the message names the file and line); ``data.prepared`` is a
            folder that holds something other than a prepared corpus.
    """
    want = identity(cfg, files, tokenizer)
    folder = Path(cfg.prepared) if cfg.prepared is not None else prepared_root() / corpus_name(cfg, files)
    if cfg.prepared is None and tokenizer is not None and _reason(folder, want) is not None:
        # A checkpoint's tokenizer other than the one learned here: its own folder, so that
        # fine-tuning does not rebuild the corpus that fresh runs reuse.
        folder = folder.with_name(f"{folder.name}.tok-{want['tokenizer']['sha256'][:8]}")
    if not force and _reason(folder, want) is None:
        return _open(folder)
    with _locked(folder):
        reason = _reason(folder, want)
        if reason is None and not force:  # built by another process meanwhile
            return _open(folder)
        log.info("preparing %s (%s)", folder, reason or "rebuilding as asked")
        build(cfg, files, folder, want, tokenizer, progress)
    return _open(folder)


def _reason(folder: Path, want: dict[str, Any]) -> str | None:
    """Why ``folder`` cannot be reused as it is (None: it can)."""
    if not folder.exists():
        return "not prepared yet"
    if not folder.is_dir():
        raise DataError(f"'data.prepared': {folder} is a file, not a folder")
    # Only a folder that is surely a prepared corpus is ever replaced: nothing else is lost.
    manifest = read_manifest(folder)
    if manifest is None and not any(folder.iterdir()):
        return "the folder is empty"
    if manifest is None or not {"format", "inputs", "files"} <= manifest.keys():
        raise DataError(
            f"'data.prepared': {folder} holds files but no prepared corpus's {MANIFEST}; it is left as it is: "
            "choose another folder, or empty this one"
        )
    return mismatch(manifest, want) or damaged(folder, manifest)


def _open(folder: Path) -> PreparedCorpus:
    corpus = PreparedCorpus.open(folder)
    train = corpus.manifest["splits"]["train"]
    log.info("prepared corpus %s: %d training pairs (of %d; %d with an empty side and %d longer than %d tokens "
             "dropped), %d validation, %s test", folder, train["pairs"], train["lines"], train["dropped"]["empty"],
             train["dropped"]["too_long"], corpus.manifest["settings"]["max_len"], len(corpus.valid),
             len(corpus.test) if corpus.test is not None else "no")
    return corpus


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the lock on building ``folder`` (a file beside it), waiting for another holder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is preparing %s", folder)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(
    cfg: DataConfig, files: CorpusFiles, folder: Path, want: dict[str, Any], tokenizer: Tokenizer | None,
    progress: bool = False,
) -> None:
    """Build the prepared corpus of ``files`` into ``folder`` (replacing what is there);
    the caller holds the lock. See the module's description for the steps."""
    start = time.perf_counter()
    # Left by a prepare that was killed (no other one runs: the caller holds the lock).
    for stale in [*folder.parent.glob(f".{folder.name}.tmp-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
        log.info("removing %s, left by an unfinished prepare", stale)
        shutil.rmtree(stale, ignore_errors=True)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    staging.mkdir()
    try:
        if tokenizer is None:
            pairs, lines = sample_pairs(*files["train"], cfg.tokenizer_sample, progress)
            log.info("learning the %s tokenizer from %d of %d training pairs (sampled in %.1f s)", cfg.tokenizer,
                     len(pairs), lines, time.perf_counter() - start)
            learning = time.perf_counter()
            tokenizer = learn_tokenizer(cfg, pairs)
            del pairs
            log.info("learned the tokenizer in %.1f s", time.perf_counter() - learning)
        state = tokenizer.state_dict()
        _save_tokenizer(staging / "tokenizer.pt", state)
        dtype = id_dtype(max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size))
        workers = cfg.prepare_workers or len(os.sched_getaffinity(0))
        splits = {}
        for split, pair in files.items():
            if pair is not None:
                encoding = time.perf_counter()
                splits[split] = encode_split(split, pair, staging, state, dtype, cfg.max_len, workers, progress)
                seconds = time.perf_counter() - encoding
                log.info("encoded %s: %d pairs in %.1f s (%.0f pairs/s)", split, splits[split]["lines"], seconds,
                         splits[split]["lines"] / max(seconds, 1e-9))
        sizes = {p.name: p.stat().st_size for p in sorted(staging.iterdir())}
        manifest = {**want, "tokenizer": {**want["tokenizer"], "sha256": tokenizer_digest(state)},
                    "dtype": dtype.name, "splits": splits, "files": sizes,
                    "built": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.perf_counter() - start, 1)}
        _write(staging / MANIFEST, lambda f: f.write(_json(manifest)))
        fsync_dir(staging)
        _replace(folder, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    train = splits["train"]
    log.info("prepared %s in %.1f s: %d training pairs kept of %d (%d with an empty side, %d longer than %d tokens)",
             folder, time.perf_counter() - start, train["pairs"], train["lines"], train["dropped"]["empty"],
             train["dropped"]["too_long"], cfg.max_len)


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()


def _save_tokenizer(path: Path, state: dict[str, Any]) -> None:
    import torch

    _write(path, lambda f: torch.save({"tokenizer": state}, f))


def _write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _replace(folder: Path, staging: Path) -> None:
    """Put the finished ``staging`` folder in ``folder``'s place. In between the two renames
    ``folder`` is absent (a reader then rebuilds), never half written."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(staging, folder)
    fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
