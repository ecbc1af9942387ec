"""Batches and the masks built from them.

Every mask in this package is a bool tensor in which True means "may attend"
(the convention of ``F.scaled_dot_product_attention``). They are all made here:

* source mask (B, 1, S): True on real source tokens, False on padding;
* target mask (B, T, T): True where the key is not padding and not in the future.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor


def subsequent_mask(size: int, device: torch.device | str | None = None) -> Tensor:
    """Mask out future positions: position i may attend to positions 0..i.

    Shape:
        returns (1, size, size), bool, True on and below the diagonal.
    """
    return torch.ones(1, size, size, dtype=torch.bool, device=device).tril()


def padding_mask(tokens: Tensor, pad: int) -> Tensor:
    """True on real tokens. Shape: (B, T) -> (B, 1, T)."""
    return (tokens != pad).unsqueeze(-2)


def target_mask(tgt: Tensor, pad: int) -> Tensor:
    """Hide padding and future words. Shape: (B, T) -> (B, T, T)."""
    return padding_mask(tgt, pad) & subsequent_mask(tgt.size(-1), device=tgt.device)


class Batch:
    """One batch of padded sentence pairs, with its masks.

    ``tgt`` as given starts with ``<s>``; the decoder reads ``tgt_in`` (all but the last
    token) and learns to predict ``tgt_out`` (all but the first), i.e. the next token
    at every position. ``ntokens`` counts the non-padding target tokens as a plain int,
    computed where the batch is built, so reading it never waits for a device.

    Shape:
        src (B, S), src_mask (B, 1, S), tgt_in and tgt_out (B, T), tgt_mask (B, T, T).
    """

    def __init__(self, src: Tensor, tgt: Tensor | None = None, pad: int = 0):
        self.src, self.src_mask = src, padding_mask(src, pad)
        self.tgt_in = self.tgt_out = self.tgt_mask = None
        self.ntokens = 0
        if tgt is not None:
            self.tgt_in, self.tgt_out = tgt[:, :-1], tgt[:, 1:]
            self.tgt_mask = target_mask(self.tgt_in, pad)
            self.ntokens = int((self.tgt_out != pad).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The same batch with every tensor on ``device``."""
        moved = copy.copy(self)
        for name in ("src", "src_mask", "tgt_in", "tgt_out", "tgt_mask"):
            if (t := getattr(self, name)) is not None:
                setattr(moved, name, t.to(device, non_blocking=non_blocking))
        return moved


def pad_sequences(seqs: list[list[int]], pad: int) -> Tensor:
    """Right-pad lists of ids into a (B, max_len) long tensor."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """A generator for one stream of a run's randomness (e.g. one epoch's batch order),
    reproducible from the run's seed alone, so that a resumed run sees the same data."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def collate(src: list[list[int]], tgt: list[list[int]], pad: int) -> Batch:
    """Pad id lists of source and target (with ``<s>``/``</s>``) into a ``Batch``."""
    return Batch(pad_sequences(src, pad), pad_sequences(tgt, pad), pad=pad)


def token_batches(
    src_lens: list[int],
    tgt_lens: list[int],
    max_tokens: int,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Group example indices into batches that fit a token budget.

    Examples are sorted by length (source, then target), so that a batch holds
    sentences of similar lengths and little padding; consecutive examples are taken
    while ``batch size × longest sequence`` (on either side, padding included) stays
    within ``max_tokens``. With a ``generator``, ties in length are broken at random
    and the batches come out in random order (a new order per epoch when the
    generator is seeded per epoch); without one, the order is deterministic.

    Every index appears in exactly one batch.

    Raises:
        ValueError: if a single example is longer than ``max_tokens``.
    """
    n = len(src_lens)
    if len(tgt_lens) != n:
        raise ValueError(f"{n} source lengths but {len(tgt_lens)} target lengths")
    start = torch.randperm(n, generator=generator).tolist() if generator is not None else range(n)
    # Python's sort is stable: equal lengths keep the random order drawn above.
    order = sorted(start, key=lambda i: (src_lens[i], tgt_lens[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        size = max(src_lens[i], tgt_lens[i])
        if size > max_tokens:
            raise ValueError(f"example {i} has {size} tokens, more than the batch budget of {max_tokens}")
        if current and (len(current) + 1) * max(longest, size) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    if current:
        batches.append(current)
    if generator is not None:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
    return batches
