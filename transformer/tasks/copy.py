"""The article's first example: learn to copy a random sequence of symbols."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from transformer.config import CopyTaskConfig, DecodeConfig
from transformer.data.batching import Batch, pad_sequences, seeded_generator
from transformer.data.tokenizers import IdTokenizer
from transformer.inference.translator import Translator
from transformer.model.architecture import EncoderDecoder
from transformer.tasks import Score

log = logging.getLogger(__name__)


def random_sequences(cfg: CopyTaskConfig, n: int, generator: torch.Generator) -> list[list[int]]:
    """n sequences of symbols 1..vocab_size-1, of lengths drawn from [min_len, seq_len]."""
    lengths = torch.randint(cfg.min_len, cfg.seq_len + 1, (n,), generator=generator)
    symbols = torch.randint(1, cfg.vocab_size, (n, cfg.seq_len), generator=generator)
    return [row[:length].tolist() for row, length in zip(symbols, lengths)]


def data_gen(cfg: CopyTaskConfig, nbatches: int, generator: torch.Generator) -> Iterator[Batch]:
    """Batches whose target is the source itself, preceded by the start symbol.

    The reference overwrote the first symbol of every sequence with the start symbol;
    here the start symbol is prepended, so every symbol of the source is copied.
    """
    tok = IdTokenizer(cfg.vocab_size)
    for _ in range(nbatches):
        seqs = random_sequences(cfg, cfg.batch_size, generator)
        src = pad_sequences(seqs, tok.pad_id)
        tgt = pad_sequences([[tok.bos_id, *s] for s in seqs], tok.pad_id)
        yield Batch(src, tgt, pad=tok.pad_id)


class CopyTask:
    """Training and validation batches for the copy task, reproducible from a seed.

    Epoch e always sees the same batches (its generator is seeded from the seed and e),
    so an interrupted run can regenerate exactly what it would have seen. The best
    model is the one with the lowest validation loss.

    Args:
        decode: how ``finish`` decodes its demo sequences.
    """

    def __init__(self, cfg: CopyTaskConfig, seed: int, decode: DecodeConfig | None = None):
        self.cfg = cfg
        self.seed = seed
        self.decode = decode if decode is not None else DecodeConfig(beam_size=1, max_len_a=1.0, max_len_b=0)
        self.tokenizer = IdTokenizer(cfg.vocab_size)

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        batches = data_gen(self.cfg, self.cfg.train_batches, seeded_generator(self.seed, epoch + 1))
        return islice(batches, start, None)  # drawn in order: the ones skipped are drawn too

    def valid_batches(self) -> Iterator[Batch]:
        return data_gen(self.cfg, self.cfg.valid_batches, seeded_generator(self.seed, 0))

    def demo_sources(self, n: int) -> list[str]:
        """A few random sequences, as text, to decode at the end of training."""
        seqs = random_sequences(self.cfg, n, seeded_generator(self.seed, -1))
        return [self.tokenizer.decode_tgt(s) for s in seqs]

    def score(self, translator: Translator, valid_loss: float) -> Score:
        return Score(-valid_loss)

    def finish(self, model: EncoderDecoder, run_dir: Path, metrics: Any, n_demo: int) -> list[tuple[str, str]]:
        """Decode ``n_demo`` fresh random sequences with the final model and log how many came out exact."""
        translator = Translator(model, self.tokenizer, self.decode, next(model.parameters()).device)
        sources = self.demo_sources(n_demo)
        outputs = translator.translate(sources)
        for src, out in zip(sources, outputs):
            log.info("decode: %s -> %s", src, out)
        log.info("copied %d of %d sequences exactly", sum(s == o for s, o in zip(sources, outputs)), len(sources))
        return list(zip(sources, outputs))
