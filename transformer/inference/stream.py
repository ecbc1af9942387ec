"""Greedy decoding of sentences that come and go: continuous batching for a server.

A batch decoded as a whole (``greedy_decode``) keeps its rows until its longest
sentence ends, and a sentence that arrives meanwhile waits for the whole batch. In a
``GreedyStream`` sentences join the rows being decoded between two steps and leave as
soon as they end, so every step decodes every sentence in flight, and none waits for
others to finish. The rows are then at different steps: the decoder cache holds
each row's keys right-aligned with its own length (``DecoderCache.length`` as a tensor),
and each row gets its own positions and attends to its own keys only.

A sentence gets the tokens ``greedy_decode`` gives it alone (up to rounding, as for any
two batches; ``tests/test_search.py`` compares them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import torch

from transformer.data.batching import pad_sequences, padding_mask
from transformer.fast.decoding import argmax_rows, encode_in_pieces
from transformer.inference.search import Hypothesis
from transformer.model.architecture import EncoderDecoder


class GreedyStream:
    """Rows decoded greedily one step at a time, which sentences join and leave.

    ``add`` queues a sentence under a key; each ``step`` lets the queued sentences join
    (encoding them), decodes one token for every row, and returns the sentences that
    ended, as (key, [``Hypothesis``]) pairs: what ``Translator.search`` gives a sentence
    greedily with ``scores`` False (scores NaN). An empty source ends at once, with an
    empty hypothesis.

    Args:
        limit: tokens to generate at most for a source of a given length.
    """

    def __init__(self, model: EncoderDecoder, bos: int, eos: int | None, pad: int, limit: Callable[[int], int],
                 device: torch.device):
        self.model, self.bos, self.eos, self.pad, self.limit, self.device = model, bos, eos, pad, limit, device
        self._waiting: list[tuple[Hashable, list[int]]] = []
        # One entry per row being decoded.
        self._keys: list[Hashable] = []
        self._words: list[list[int]] = []  # the tokens generated so far
        self._limits: list[int] = []
        self._src_lengths: list[int] = []
        self._cache = model.new_cache()
        self._src_mask: torch.Tensor | None = None  # (B, 1, S)
        self._last: torch.Tensor | None = None  # each row's newest token, (B, 1)

    def add(self, key: Hashable, source: Sequence[int]) -> None:
        """Queue a sentence (source ids, no padding); it joins at the next step."""
        self._waiting.append((key, list(source)))

    def __len__(self) -> int:
        """Sentences decoding or waiting to join."""
        return len(self._keys) + len(self._waiting)

    @property
    def decoding(self) -> int:
        """Rows being decoded."""
        return len(self._keys)

    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, list[Hypothesis]]]:
        """Let the waiting sentences join, decode one token for every row, and return
        the sentences that ended."""
        ended = self._join()
        if not self._keys:
            return ended
        out, self._cache = self.model.decode(None, self._src_mask, self._last, None, self._cache)
        logits = self.model.logits(out[:, -1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logits[:, self.pad] = -torch.inf  # padding is never a word
        words = argmax_rows(logits)
        keep = []
        for row, word in enumerate(words.tolist()):
            generated = self._words[row]
            if word == self.eos:
                ended.append((self._keys[row], _hypothesis(generated, ended=True)))
                continue
            generated.append(word)
            if len(generated) >= self._limits[row]:
                ended.append((self._keys[row], _hypothesis(generated, ended=False)))
            else:
                keep.append(row)
        self._last = words.unsqueeze(1)
        if len(keep) < len(self._keys):
            self._drop(keep)
        return ended

    def _join(self) -> list[tuple[Hashable, list[Hypothesis]]]:
        """Encode the waiting sentences and add them as rows that have decoded nothing yet."""
        waiting, self._waiting = self._waiting, []
        ended = [(key, _hypothesis([], ended=False)) for key, source in waiting if not source]
        waiting = [(key, source) for key, source in waiting if source]
        if not waiting:
            return ended
        sources = [source for _, source in waiting]
        src = pad_sequences(sources, self.pad).to(self.device)
        src_mask = padding_mask(src, self.pad)
        new = self.model.new_cache(encode_in_pieces(self.model, src, src_mask))
        first = torch.full((len(sources), 1), self.bos, dtype=torch.long, device=self.device)
        if self._keys:
            width = max(self._src_mask.size(-1), src_mask.size(-1))
            self._cache.append_rows(new, width)
            self._src_mask = torch.cat([_pad_mask(self._src_mask, width), _pad_mask(src_mask, width)])
            self._last = torch.cat([self._last, first])
        else:
            new.length = torch.zeros(len(sources), dtype=torch.long, device=self.device)
            self._cache, self._src_mask, self._last = new, src_mask, first
        for key, source in waiting:
            self._keys.append(key)
            self._words.append([])
            self._limits.append(self.limit(len(source)))
            self._src_lengths.append(len(source))
        return ended

    def _drop(self, keep: list[int]) -> None:
        """Keep only the rows ``keep``; cut the padding no row needs any more."""
        self._keys = [self._keys[i] for i in keep]
        self._words = [self._words[i] for i in keep]
        self._limits = [self._limits[i] for i in keep]
        self._src_lengths = [self._src_lengths[i] for i in keep]
        if not keep:
            self._cache, self._src_mask, self._last = self.model.new_cache(), None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.reorder(index)
        self._last = self._last[index]
        width = max(self._src_lengths)
        self._src_mask = self._src_mask[index, :, :width]
        self._cache.trim(src_width=width)


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A source mask (B, 1, S) widened to ``width`` with positions nobody may see."""
    missing = width - mask.size(-1)
    return mask if missing <= 0 else torch.cat([mask, mask.new_zeros(*mask.shape[:-1], missing)], dim=-1)


def _hypothesis(tokens: list[int], ended: bool) -> list[Hypothesis]:
    """The one-hypothesis list of a greedy search (its length counts the end symbol)."""
    return [Hypothesis(tokens, math.nan, math.nan, len(tokens) + ended)]
