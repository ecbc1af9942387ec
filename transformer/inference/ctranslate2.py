"""Translate with a model exported to CTranslate2 (``python -m transformer.export``).

``CTranslate2Translator`` has ``Translator``'s interface (``encode``, ``search``,
``detokenize``, ``translate``, ``translate_nbest``, ``cfg``, ``tokenizer``), so
``translate.py --engine ctranslate2`` and a server switch engines without other
changes; the model runs in CTranslate2's C++ engine instead of torch.

How our decoding maps onto ``ctranslate2.Translator.translate_batch``:

* Greedy: the same tokens as ``greedy_decode``. ``min_decoding_length`` 0 (its default
  of 1 forbids ``</s>`` first), padding suppressed (we never emit it), and each
  sentence's own limit a·length + b: CTranslate2 takes one ``max_decoding_length`` per
  call, so a batch decodes to its longest limit and each output is cut to its own (a
  greedy output cut at step n is what decoding to n gives); when scores are asked
  for, one call per limit instead (a cut output's score is unknown).
* Beam search: the sentences of a batch are grouped by limit (one call each, all in
  flight at once). CTranslate2 ranks by log-probability / length^α, length without
  ``</s>``, and stops a sentence when its best candidate ends, once it has
  ``num_hypotheses`` finished ones; we rank by GNMT's log-probability /
  ((5 + length) / 6)^α, length with ``</s>``, and stop when no live prefix can beat the
  n-th best. So it runs with α 0, returns the ``beam_size · patience`` finished
  hypotheses it collected, with their log-probabilities, and those are re-ranked by our
  formula. With α 0 and one hypothesis, that is our search exactly. Otherwise its
  hypotheses are those our search had found when CTranslate2 stopped (or later ones no
  better): the best of them under GNMT is ours or, when our search went on and found a
  better (usually longer) one, worse; never better (docs/exporting.md measures how often).
* Scores are our ``Hypothesis.score``: log-probability (``</s>`` included) / GNMT, the
  probabilities normalised without padding (suppressed), which ours include.

On a CPU, ``workers`` (default: 2 with two cores or more) are CTranslate2's
``inter_threads``, each with ``threads // workers`` intra-op threads, and every batch
is queued at once: on 2 cores, two one-thread workers decoded test2016 1.2× (greedy)
to 1.4× (beam 5) faster than one with two threads, as with our own decoder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformer.config import Config, DecodeConfig, check_nbest, from_dict
from transformer.data.tokenizers import SentencePieceTokenizer, Tokenizer, tokenizer_from_state
from transformer.inference.sentences import SentenceTranslator

log = logging.getLogger(__name__)

METADATA = "transformer.json"  # as transformer.export.converter writes it
FORMAT = "annotated-transformer/ctranslate2"
# --dtype names -> CTranslate2's compute types.
COMPUTE_TYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}


class ExportedModelError(ValueError):
    """A folder that is not a usable exported model; the message names it."""


def is_exported_model(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``python -m transformer.export``."""
    return (Path(path) / METADATA).is_file()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """``transformer.json`` of an exported folder, checked."""
    path = Path(path)
    if not path.is_dir():
        raise ExportedModelError(f"{path}: no such folder (an exported model is a folder: "
                                 "python -m transformer.export)")
    file = path / METADATA
    if not file.is_file():
        raise ExportedModelError(f"{path}: not a model exported by python -m transformer.export (no {METADATA})")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportedModelError(f"{file}: unreadable ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportedModelError(f"{file}: not written by python -m transformer.export")
    if meta.get("format_version", 0) > 1:
        raise ExportedModelError(f"{file}: format {meta['format_version']} is newer than this code reads; upgrade")
    return meta


def _tokenizer(path: Path, meta: dict[str, Any]) -> Tokenizer:
    state = meta["tokenizer"]
    if state.get("kind") == "sentencepiece":
        file = path / state["model_file"]
        try:
            return SentencePieceTokenizer(file.read_bytes())
        except OSError as e:
            raise ExportedModelError(f"{file}: cannot read the SentencePiece model ({e})") from e
    return tokenizer_from_state(state)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class CTranslate2Translator(SentenceTranslator):
    """An exported model in CTranslate2, with ``Translator``'s interface.

    Args:
        translator: the loaded ``ctranslate2.Translator`` (shared by ``with_decoding``'s copies).
        tokenizer: this project's tokenizer of the model.
        cfg: decoding settings (``workers``, ``dtype`` and ``cache`` are fixed at loading
            or do not apply).
        meta: the folder's ``transformer.json``.
    """

    engine = "ctranslate2"

    def __init__(self, translator: Any, tokenizer: Tokenizer, cfg: DecodeConfig, meta: dict[str, Any],
                 path: str | Path, device: str = "cpu", compute_type: str = "default", threads: int = 1):
        self.translator = translator
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.meta = meta
        self.path = Path(path)
        self.device = device
        self.compute_type = compute_type
        self.config: Config = from_dict(meta["config"])  # the checkpoint's whole config
        self.max_positions: int = meta["max_positions"]
        self.model = None  # no torch model: attention pictures need the checkpoint
        self.workers = translator.num_translators  # CTranslate2's inter_threads
        self.threads = threads  # its intra_threads, each
        # Beam search collects beam_size · patience finished hypotheses (decode.patience, else 1).
        self.patience = 1.0 if cfg.patience is None else cfg.patience
        if not self.patience > 0:
            raise ValueError(f"patience must be positive, got {self.patience}")
        tokens = meta["tokens"]
        vocab = self._vocabularies()
        self.src_tokens, self.tgt_tokens = vocab
        self.tgt_ids = {t: i for i, t in enumerate(self.tgt_tokens)}
        self.eos, self.pad, self.add_source_eos = tokens["eos"], tokens["pad"], tokens["add_source_eos"]
        self.has_eos = tokens["has_eos"]

    def _vocabularies(self) -> tuple[list[str], list[str]]:
        def read(name: str) -> list[str] | None:
            file = self.path / f"{name}_vocabulary.json"
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None

        shared = read("shared")
        src, tgt = (shared, shared) if shared is not None else (read("source"), read("target"))
        if src is None or tgt is None:
            raise ExportedModelError(f"{self.path}: the vocabulary files are missing")
        return src, tgt

    @classmethod
    def from_directory(cls, path: str | Path, device: str = "cpu", compute_type: str | None = None,
                       workers: int | None = None, threads: int | None = None, **decode_overrides) -> "CTranslate2Translator":
        """Load an exported folder.

        Args:
            device: "cpu", "cuda", "cuda:N" or "auto".
            compute_type: CTranslate2's ("float32", "int8", "bfloat16", ...), or a
                ``--dtype`` name ("fp32", "bf16", "fp16", "int8"); default: the weights'
                own type (the quantization chosen at export).
            workers: translations run at once (``inter_threads``; default 2 on a CPU with
                two cores or more, else 1).
            threads: threads in all, shared among the workers (default: the cores).
            decode_overrides: fields of the checkpoint's decode config to replace. Among
                them ``patience`` (default: the checkpoint's ``decode.patience``, else 1):
                beam search stops once it has ``beam_size · patience`` finished hypotheses
                (and its best candidate ended), and our penalty ranks them: more patience,
                closer to our full search, slower (docs/exporting.md); ``Translator`` with
                the same ``decode.patience`` finds the same.

        Raises:
            ExportedModelError: a folder that is not an export, or that CTranslate2 cannot load.
            ImportError: ctranslate2 is not installed.
        """
        try:
            import ctranslate2
        except ImportError as e:
            raise ImportError(f"the ctranslate2 engine needs the ctranslate2 package ({e}): "
                              "pip install -e \".[export]\"") from None
        path = Path(path)
        meta = read_metadata(path)
        tokenizer = _tokenizer(path, meta)
        cfg = dataclasses.replace(from_dict(meta["config"]).decode, **decode_overrides)
        name, _, index = device.partition(":")
        if name == "auto":
            name = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        if name not in ("cpu", "cuda"):
            raise ExportedModelError(f"unknown device {device!r} for ctranslate2 (cpu, cuda, cuda:N, auto)")
        compute = COMPUTE_TYPES.get(compute_type, compute_type) if compute_type else "default"
        cores = threads or _cpu_count()
        if workers is None:
            workers = cfg.workers or (2 if name == "cpu" and cores >= 2 else 1)
        intra = max(1, cores // workers) if name == "cpu" else 0
        try:
            translator = ctranslate2.Translator(
                str(path), device=name, device_index=int(index or 0), compute_type=compute,
                inter_threads=workers, intra_threads=intra,
            )
        except (RuntimeError, ValueError) as e:
            raise ExportedModelError(f"{path}: ctranslate2 cannot load it ({e})") from e
        log.info("loaded %s in ctranslate2 %s on %s: %s, %d worker(s) x %d thread(s)", path,
                 ctranslate2.__version__, name, translator.compute_type, workers, intra)
        return cls(translator, tokenizer, cfg, meta, path, name, translator.compute_type, intra)

    def with_decoding(self, **overrides) -> "CTranslate2Translator":
        """A translator decoding otherwise (e.g. ``beam_size=5`` or ``patience=2``: fields
        of ``cfg``) with the same loaded model."""
        return CTranslate2Translator(self.translator, self.tokenizer, dataclasses.replace(self.cfg, **overrides),
                                     self.meta, self.path, self.device, self.compute_type, self.threads)

    # -- text <-> ids, as Translator ------------------------------------------------------

    def _cut(self, ids: list[int]) -> list[int]:
        """An over-long source keeps its ``</s>`` (CTranslate2 appends one to every source),
        where ``Translator`` cuts it off with the rest."""
        if self.add_source_eos:
            return ids[: self.max_positions - 1] + [self.tokenizer.eos_id]
        return ids[: self.max_positions]

    # -- decoding -------------------------------------------------------------------------

    def _source_tokens(self, ids: list[int]) -> list[str]:
        if self.add_source_eos and ids and ids[-1] == self.tokenizer.eos_id:
            ids = ids[:-1]  # CTranslate2 appends it (add_source_eos)
        return [self.src_tokens[i] for i in ids]

    def search(self, sources: Sequence[list[int]], nbest: int | None = None, scores: bool = True) -> list[list[Any]]:
        """Decode source id lists into hypotheses, best first (see ``Translator.search``).

        Every batch is queued at once, so CTranslate2's workers decode them in parallel.
        """
        from transformer.inference.search import Hypothesis

        cfg = self.cfg
        nbest = cfg.nbest if nbest is None else nbest
        results: list[list[Any]] = [[Hypothesis([], math.nan, math.nan, 0)] for _ in sources]
        limits = self._length_limits([len(s) for s in sources])
        greedy = cfg.beam_size == 1
        # CTranslate2 runs with α 0, so it stops a sentence once its best candidate has
        # ended and it has ``num_hypotheses`` finished ones. With our α 0 too, that is
        # where our full search stops (for one hypothesis). Otherwise it returns all it
        # collected, beam_size · patience of them, for our length penalty to rank (as
        # our search with ``decode.patience`` does).
        if greedy or (cfg.length_penalty == 0 and cfg.patience is None):
            patience, pool = 1.0, nbest
        else:
            patience, pool = self.patience, round(cfg.beam_size * self.patience)
        check_nbest(nbest, cfg.beam_size, patience)
        # Greedy without scores: one call per batch at its longest limit, each output cut
        # to its own (its score would then be wrong). Otherwise one call per limit.
        by_limit = scores or not greedy
        jobs = []
        for batch in self._batches(sources):
            longest = max(limits[i] for i in batch)
            groups: dict[int, list[int]] = {}
            for i in batch:
                groups.setdefault(limits[i] if by_limit else longest, []).append(i)
            for limit, group in groups.items():
                pending = self.translator.translate_batch(
                    [self._source_tokens(sources[i]) for i in group],
                    asynchronous=True, beam_size=cfg.beam_size, num_hypotheses=pool, length_penalty=0.0,
                    patience=patience,
                    max_decoding_length=limit, min_decoding_length=0, max_input_length=0,
                    return_scores=scores or not greedy, return_end_token=True,
                    suppress_sequences=[[self.pad]],
                )
                jobs.append((group, pending))
        for group, pending in jobs:
            for i, job in zip(group, pending):
                found = job.result()
                log_probs = found.scores or [math.nan] * len(found.hypotheses)
                hyps = [self._hypothesis(tokens, lp, limits[i]) for tokens, lp in zip(found.hypotheses, log_probs)]
                hyps.sort(key=lambda h: -h.score)
                results[i] = hyps[:nbest]
        return results

    def _hypothesis(self, tokens: list[str], log_prob: float, limit: int) -> Any:
        """Our ``Hypothesis`` of CTranslate2's output tokens (``</s>`` last if it ended),
        cut to ``limit`` (a greedy output that went on past it: its score is then unknown)."""
        from transformer.inference.search import Hypothesis, length_penalty

        ended = self.has_eos and bool(tokens) and tokens[-1] == self.eos
        ids = [self.tgt_ids[t] for t in (tokens[:-1] if ended else tokens)]
        if len(ids) + ended > limit:
            ids, ended, log_prob = ids[:limit], False, math.nan
        length = len(ids) + ended
        return Hypothesis(ids, log_prob / length_penalty(length, self.cfg.length_penalty), log_prob, length)
