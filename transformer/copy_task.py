"""The article's first example: learn to copy a random sequence of symbols."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from transformer.batching import Batch, pad_sequences, seeded_generator
from transformer.config import CopyTaskConfig
from transformer.tokenize import IdTokenizer


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
        yield Batch.make(src, tgt, pad=tok.pad_id)


class CopyTask:
    """Training and validation batches for the copy task, reproducible from a seed.

    Epoch e always sees the same batches (its generator is seeded from the seed and e),
    so an interrupted run can regenerate exactly what it would have seen.
    """

    def __init__(self, cfg: CopyTaskConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.tokenizer = IdTokenizer(cfg.vocab_size)

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        return data_gen(self.cfg, self.cfg.train_batches, seeded_generator(self.seed, epoch + 1))

    def valid_batches(self) -> Iterator[Batch]:
        return data_gen(self.cfg, self.cfg.valid_batches, seeded_generator(self.seed, 0))

    def demo_sources(self, n: int) -> list[str]:
        """A few random sequences, as text, to decode at the end of training."""
        seqs = random_sequences(self.cfg, n, seeded_generator(self.seed, -1))
        return [self.tokenizer.decode_tgt(s) for s in seqs]
