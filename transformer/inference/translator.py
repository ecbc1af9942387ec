"""Translate lists of sentences with a trained model, from Python or the command line."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from transformer.config import DecodeConfig, check_nbest
from transformer.data.batching import pad_sequences, padding_mask
from transformer.data.tokenizers import Tokenizer
from transformer.fast.packed import can_pack, packed_copy
from transformer.inference.sentences import SentenceTranslator
from transformer.inference.stream import GreedyStream
from transformer.inference.search import (
    Hypothesis,
    beam_search,
    greedy_decode,
    length_penalty,
    rescore,
    strip_hypothesis,
)
from transformer.model.architecture import EncoderDecoder
from transformer.runtime import DTYPES, resolve_device
from transformer.training.checkpoint import load_model


class Translator(SentenceTranslator):
    """A model, its tokenizer and decoding settings: sentences in, sentences out.

    Sentences are decoded in batches sorted by length (less padding) and returned in
    the input order, greedily or with beam search as ``cfg.beam_size`` says. An empty
    sentence gives an empty translation; one longer than the model's positional table
    is cut, with a warning. On a CPU, ``cfg.workers`` batches are decoded at once in
    threads, each on its share of the cores; the outputs do not depend on it.

    With ``cfg.dtype`` set and different from the model's, a copy of the model cast
    to that dtype decodes (the model given is left as it is). On a CPU, by default, a
    copy with its linear layers packed for oneDNN decodes (``transformer.fast.packed``:
    faster, the same outputs up to rounding); ``packed=False`` decodes with the model as
    it is.
    """

    def __init__(self, model: EncoderDecoder, tokenizer: Tokenizer, cfg: DecodeConfig, device: torch.device,
                 packed: bool = True):
        if cfg.dtype is not None:
            dtype = DTYPES[cfg.dtype]
            if dtype == torch.float16 and device.type != "cuda":
                raise ValueError(f"decoding in fp16 needs a CUDA device, not {device}; on the CPU use bf16")
            if next(model.parameters()).dtype != dtype:
                model = copy.deepcopy(model).to(dtype)
        if packed and device.type == "cpu" and can_pack(model):
            model = packed_copy(model)
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.max_positions = model.max_positions
        # Batches decoded at once (see ``search``): by default two on a CPU with two
        # threads or more, where two one-thread workers use the cores better than one
        # batch on both (docs/performance.md).
        if cfg.workers is not None:
            self.workers = cfg.workers
        else:
            self.workers = 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", packed: bool = True,
                        **decode_overrides) -> "Translator":
        """Load a checkpoint; ``decode_overrides`` replace fields of its decode config."""
        dev = resolve_device(device, "device")
        model, tokenizer, cfg = load_model(path, dev)
        return cls(model, tokenizer, dataclasses.replace(cfg.decode, **decode_overrides), dev, packed)

    def stream(self) -> GreedyStream:
        """Greedy decoding with this translator's model and limits for sentences that
        come and go (``GreedyStream``; what the server decodes greedy requests with)."""
        self.model.eval()
        tok = self.tokenizer
        return GreedyStream(self.model, tok.bos_id, tok.eos_id, tok.pad_id, lambda n: self._length_limits([n])[0],
                            self.device)

    def _limits(self, lengths: list[int]) -> torch.Tensor:
        """``_length_limits`` as a tensor, for the search functions."""
        return torch.tensor(self._length_limits(lengths))

    def search(self, sources: Sequence[list[int]], nbest: int | None = None, scores: bool = True) -> list[list[Hypothesis]]:
        """Decode source id lists (no padding) into hypotheses, best first.

        ``beam_size`` 1 decodes greedily; its one hypothesis is then scored by running
        the model over it (unless ``scores`` is False, when scores are NaN). An empty
        source gives one empty hypothesis.

        Args:
            nbest: hypotheses per sentence (default: the config's ``nbest``).
        """
        cfg = self.cfg
        nbest = cfg.nbest if nbest is None else nbest
        check_nbest(nbest, cfg.beam_size, cfg.patience)
        results: list[list[Hypothesis]] = [[Hypothesis([], math.nan, math.nan, 0)] for _ in sources]
        self.model.eval()
        # The biggest batches first: with several workers, none is then left with a long
        # one at the end (the order changes nothing else).
        batches = sorted(self._batches(sources), key=lambda index: -len(index) * len(sources[index[-1]]))
        workers = min(self.workers, len(batches))
        if workers > 1:
            decoded = self._decode_in_parallel(sources, batches, nbest, scores, workers)
        else:
            decoded = (self._decode_batch(sources, index, nbest, scores) for index in batches)
        for index, found in zip(batches, decoded):
            for i, hyps in zip(index, found):
                results[i] = hyps
        return results

    def _decode_in_parallel(
        self, sources: Sequence[list[int]], batches: list[list[int]], nbest: int, scores: bool, workers: int
    ) -> list[list[list[Hypothesis]]]:
        """``_decode_batch`` for each batch, ``workers`` at once in threads, each on its
        share of the threads; the outputs are the same as one batch at a time.

        A decoding step is a chain of small products that two threads speed up far less
        than twice, so two one-thread workers use two cores better.
        """
        threads = torch.get_num_threads()
        share = (max(1, threads // workers),)
        try:
            with ThreadPoolExecutor(workers, "decode", initializer=torch.set_num_threads, initargs=share) as pool:
                return list(pool.map(lambda index: self._decode_batch(sources, index, nbest, scores), batches))
        finally:
            # A per-thread setting, but the workers' calls also changed the default for new threads.
            torch.set_num_threads(threads)

    def _decode_batch(
        self, sources: Sequence[list[int]], index: list[int], nbest: int, scores: bool
    ) -> list[list[Hypothesis]]:
        """Hypotheses for the sources ``index`` (non-empty), decoded as one batch."""
        tok, cfg = self.tokenizer, self.cfg
        src = pad_sequences([sources[i] for i in index], tok.pad_id).to(self.device)
        src_mask = padding_mask(src, tok.pad_id)
        limits = self._limits([len(sources[i]) for i in index]).to(self.device)
        if cfg.beam_size > 1:
            return beam_search(
                self.model, src, src_mask, limits, tok.bos_id, tok.eos_id, cfg.beam_size,
                alpha=cfg.length_penalty, nbest=nbest, pad=tok.pad_id, use_cache=cfg.cache, patience=cfg.patience,
            )
        ys = greedy_decode(self.model, src, src_mask, limits, tok.bos_id, tok.eos_id, tok.pad_id, cfg.cache)
        found = [[self._greedy_hypothesis(row, limit)] for row, limit in zip(ys.tolist(), limits.tolist())]
        if scores:
            self._score(found, src, src_mask)
        return found

    def _greedy_hypothesis(self, row: list[int], limit: int) -> Hypothesis:
        tokens = strip_hypothesis(row, self.tokenizer.eos_id, self.tokenizer.pad_id)
        ended = self.tokenizer.eos_id is not None and len(tokens) < limit
        return Hypothesis(tokens, math.nan, math.nan, len(tokens) + ended)

    def _score(self, found: list[list[Hypothesis]], src: torch.Tensor, src_mask: torch.Tensor) -> None:
        """Fill in the log-probability and score of greedy hypotheses."""
        tok, hyps = self.tokenizer, [h[0] for h in found]
        log_probs = rescore(
            self.model, src, src_mask, [h.tokens for h in hyps], tok.bos_id, tok.eos_id, tok.pad_id,
            ended=[h.length > len(h.tokens) for h in hyps],
        )
        for h, lp in zip(hyps, log_probs.tolist()):
            h.log_prob, h.score = lp, lp / length_penalty(h.length, self.cfg.length_penalty)


def decoding_name(cfg: DecodeConfig) -> str:
    """How ``cfg`` decodes, in words for logs and reports: "greedy" or "beam 5, alpha 1.0"."""
    return "greedy" if cfg.beam_size == 1 else f"beam {cfg.beam_size}, alpha {cfg.length_penalty:g}"
