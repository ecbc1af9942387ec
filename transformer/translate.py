"""Translate lists of sentences with a trained model, from Python or the command line."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from transformer.batching import pad_sequences, padding_mask
from transformer.checkpoint import load_model
from transformer.config import DecodeConfig
from transformer.model import EncoderDecoder
from transformer.search import greedy_decode, strip_hypothesis
from transformer.tokenize import Tokenizer
from transformer.utils import resolve_device

log = logging.getLogger(__name__)


class Translator:
    """A model, its tokenizer and decoding settings: sentences in, sentences out.

    Sentences are decoded in batches sorted by length (less padding) and returned in
    the input order. An empty sentence gives an empty translation; one longer than the
    model's positional table is cut, with a warning.
    """

    def __init__(self, model: EncoderDecoder, tokenizer: Tokenizer, cfg: DecodeConfig, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.max_positions = model.src_embed[1].pe.size(1)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", **decode_overrides) -> "Translator":
        """Load a checkpoint; ``decode_overrides`` replace fields of its decode config."""
        dev = resolve_device(device)
        model, tokenizer, cfg = load_model(path, dev)
        return cls(model, tokenizer, dataclasses.replace(cfg.decode, **decode_overrides), dev)

    def _limits(self, lengths: list[int]) -> torch.Tensor:
        """Tokens to generate for each sentence: a·length + b, within the positional table."""
        cap = self.max_positions - 1  # the start symbol takes one position
        return torch.tensor([max(1, min(cap, int(self.cfg.max_len_a * n + self.cfg.max_len_b))) for n in lengths])

    def translate_ids(self, sources: Sequence[list[int]]) -> list[list[int]]:
        """Decode source id lists (no padding) into target id lists (no specials)."""
        tok = self.tokenizer
        results: list[list[int]] = [[] for _ in sources]
        order = sorted((i for i, s in enumerate(sources) if s), key=lambda i: len(sources[i]))
        self.model.eval()
        for start in range(0, len(order), self.cfg.batch_size):
            index = order[start : start + self.cfg.batch_size]
            src = pad_sequences([sources[i] for i in index], tok.pad_id).to(self.device)
            ys = greedy_decode(
                self.model,
                src,
                padding_mask(src, tok.pad_id),
                self._limits([len(sources[i]) for i in index]).to(self.device),
                start_symbol=tok.bos_id,
                end_symbol=tok.eos_id,
                pad=tok.pad_id,
                use_cache=self.cfg.cache,
            )
            for i, row in zip(index, ys.cpu()):
                results[i] = strip_hypothesis(row, tok.eos_id, tok.pad_id)
        return results

    def translate(self, sentences: Sequence[str]) -> list[str]:
        """Translate sentences; the output list matches the input one to one."""
        sources = []
        for n, sentence in enumerate(sentences, 1):
            ids = self.tokenizer.encode_src(sentence)
            if len(ids) > self.max_positions:
                log.warning(
                    "sentence %d has %d tokens; cut to the model's limit of %d", n, len(ids), self.max_positions
                )
                ids = ids[: self.max_positions]
            sources.append(ids)
        # A model can emit line breaks (e.g. through byte pieces); one input line must
        # stay one output line, so every kind of line break becomes a space.
        return [" ".join(self.tokenizer.decode_tgt(ids).splitlines()) for ids in self.translate_ids(sources)]
