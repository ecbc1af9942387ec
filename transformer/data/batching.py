"""Batches and the masks built from them.

Every mask in this package is a bool tensor in which True means "may attend"
(the convention of ``F.scaled_dot_product_attention``). They are all made here:

* source mask (B, 1, S): True on real source tokens, False on padding;
* target mask (B, T, T): True where the key is not padding and not in the future.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import numpy as np
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


class BatchPlan:
    """An epoch's batches as example indices: batch ``i`` is ``plan[i]``, an int64 array.

    Held as two flat arrays (every example's index in batch order, and where each batch
    starts), so a plan over millions of examples costs 8 bytes an example, not a Python
    list each.
    """

    def __init__(self, order: np.ndarray, starts: np.ndarray):
        self.order, self.starts = order, starts

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.order[self.starts[i]:self.starts[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))


def plan_batches(
    src_lens: Sequence[int] | np.ndarray,
    tgt_lens: Sequence[int] | np.ndarray,
    max_tokens: int,
    generator: torch.Generator | None = None,
) -> BatchPlan:
    """Group example indices into batches that fit a token budget.

    Examples are sorted by length (source, then target), so that a batch holds
    sentences of similar lengths and little padding; consecutive examples are taken
    while ``batch size × longest sequence`` (on either side, padding included) stays
    within ``max_tokens``. With a ``generator``, ties in length are broken at random
    and the batches come out in random order (a new order per epoch when the
    generator is seeded per epoch); without one, the order is deterministic.

    Every index appears in exactly one batch. Only the lengths are read, so the
    examples themselves may stay on disk.

    Raises:
        ValueError: if a single example is longer than ``max_tokens``.
    """
    src = np.asarray(src_lens, dtype=np.int64)
    tgt = np.asarray(tgt_lens, dtype=np.int64)
    n = len(src)
    if len(tgt) != n:
        raise ValueError(f"{n} source lengths but {len(tgt)} target lengths")
    start = torch.randperm(n, generator=generator).numpy() if generator is not None else np.arange(n)
    # A stable sort: equal lengths keep the random order drawn above.
    key = src[start] * (int(tgt.max(initial=0)) + 1) + tgt[start]
    order = start[np.argsort(key, kind="stable")]
    sizes = np.maximum(src, tgt)[order]
    if n and sizes.max() > max_tokens:
        worst = int(sizes.argmax())
        raise ValueError(
            f"example {int(order[worst])} has {int(sizes[worst])} tokens, more than the batch budget of {max_tokens}"
        )
    cuts = [0]
    count = longest = 0
    for k, size in enumerate(sizes.tolist()):  # lengths are small ints: Python's cached objects
        widest = size if size > longest else longest
        if count and (count + 1) * widest > max_tokens:
            cuts.append(k)
            count, widest = 0, size
        count, longest = count + 1, widest
    if n:
        cuts.append(n)
    starts = np.asarray(cuts, dtype=np.int64)
    if generator is not None and len(starts) > 1:
        shuffled = torch.randperm(len(starts) - 1, generator=generator).numpy()
        sizes_of = np.diff(starts)[shuffled]
        order = np.concatenate([order[starts[b]:starts[b + 1]] for b in shuffled])
        starts = np.concatenate([[0], np.cumsum(sizes_of)])
    return BatchPlan(order, starts)


def token_batches(
    src_lens: Sequence[int],
    tgt_lens: Sequence[int],
    max_tokens: int,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """``plan_batches`` as lists of indices (for small data and tests)."""
    return [batch.tolist() for batch in plan_batches(src_lens, tgt_lens, max_tokens, generator)]
