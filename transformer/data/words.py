"""The words of a split's token ids: where they begin, and a number for each distinct one.

A SentencePiece unigram model segments each word (a piece starting with "▁" and the
pieces up to the next one) on its own, so subword sampling (``transformer.data.sampling``)
draws a segmentation per word: it finds the words of the training split here, a chunk
of sentences at a time, and numbers the distinct ones once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from transformer.data.prepared import SIDES, Split
from transformer.data.tokenizers import SentencePieceTokenizer

WORD_START = "\u2581"
CHUNK = 1 << 16  # sentences read at once


class WordTypes:
    """Numbers distinct words (tuples of piece ids), chunk after chunk of a corpus.

    Up to ``width`` pieces are packed into one int64 (``bits`` per piece, each id plus one,
    so that no two lengths collide): a one-piece word is numbered through a table by id, a
    word of one key by a sorted array of the keys seen, and a word of several keys through
    a dict of their tuples. Only distinct words take Python's time.

    Args:
        vocab_size: the ids are below it.
    """

    def __init__(self, vocab_size: int):
        self.bits = vocab_size.bit_length()  # id + 1 fits in bits
        self.width = 63 // self.bits
        self.words: list[tuple[int, ...]] = []  # by number
        self._single = np.full(1 << self.bits, -1, dtype=np.int64)  # by key (id + 1)
        self._keys = np.empty(0, dtype=np.int64)  # the packed words seen, sorted
        self._numbers = np.empty(0, dtype=np.int64)  # their numbers
        self._long: dict[tuple[int, ...], int] = {}  # by tuple of keys

    def _new(self, words: list[tuple[int, ...]]) -> np.ndarray:
        self.words += words
        return np.arange(len(self.words) - len(words), len(self.words), dtype=np.int64)

    def _unpack(self, key: int) -> tuple[int, ...]:
        mask, word = (1 << self.bits) - 1, []
        while key:
            word.append((key & mask) - 1)
            key >>= self.bits
        return tuple(word)

    def number(self, ids: np.ndarray, bounds: np.ndarray) -> np.ndarray:
        """The number of every word of ``ids``, word ``w`` being ``ids[bounds[w]:bounds[w + 1]]``."""
        first, length = bounds[:-1], np.diff(bounds)
        numbers = np.empty(len(first), dtype=np.int64)
        if not len(first):
            return numbers
        start = np.zeros(len(ids), dtype=np.int64)
        start[first] = first
        within = np.arange(len(ids)) - np.maximum.accumulate(start)
        # Each word as keys of up to ``width`` pieces: ceil(length / width) of them.
        keys = np.add.reduceat((ids.astype(np.int64) + 1) << (self.bits * (within % self.width)),
                               np.flatnonzero(within % self.width == 0))
        parts = (length + self.width - 1) // self.width
        key_at = np.cumsum(parts) - parts
        one = length == 1
        single = keys[key_at[one]]
        new = np.unique(single[self._single[single] < 0])
        self._single[new] = self._new([(k - 1,) for k in new.tolist()])
        numbers[one] = self._single[single]
        packed = (length > 1) & (parts == 1)
        unique, inverse = np.unique(keys[key_at[packed]], return_inverse=True)
        at = np.minimum(np.searchsorted(self._keys, unique), max(len(self._keys) - 1, 0))
        seen = (self._keys[at] == unique) if len(self._keys) else np.zeros(len(unique), dtype=bool)
        found = np.where(seen, self._numbers[at] if len(self._keys) else 0, -1)
        new = unique[~seen]
        found[~seen] = self._new([self._unpack(k) for k in new.tolist()])
        order = np.argsort(np.concatenate([self._keys, new]), kind="stable")
        self._keys = np.concatenate([self._keys, new])[order]
        self._numbers = np.concatenate([self._numbers, found[~seen]])[order]
        numbers[packed] = found[inverse.reshape(-1)]
        longer = np.flatnonzero(parts > 1)
        for count in np.unique(parts[longer]).tolist():  # words of `count` keys
            words = longer[parts[longer] == count]
            rows, inverse = np.unique(keys[key_at[words][:, None] + np.arange(count)], axis=0, return_inverse=True)
            found = np.empty(len(rows), dtype=np.int64)
            for k, row in enumerate(map(tuple, rows.tolist())):
                if row not in self._long:
                    self._long[row] = int(self._new([sum(map(self._unpack, row), ())])[0])
                found[k] = self._long[row]
            numbers[words] = found[inverse.reshape(-1)]
        return numbers


class WordBoundaries:
    """Where the words of a split's sentences begin: at a piece with "▁", at a sentence's
    start, and at and after a special piece (a control one: ``<s>``, ``</s>``).

    Args:
        tokenizer: the SentencePiece model that made the split's ids.
    """

    def __init__(self, tokenizer: SentencePieceTokenizer):
        sp = tokenizer.sp
        self.starts = np.array([sp.id_to_piece(i).startswith(WORD_START) for i in range(sp.get_piece_size())])
        self.special = np.array([sp.is_control(i) for i in range(sp.get_piece_size())])

    def chunks(self, split: Split, side: str, chunk: int = CHUNK
               ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """The side's sentences ``chunk`` at a time: (first sentence, ids, offsets from the
        chunk's start, word boundaries: each word's first id, then the end)."""
        offsets = split.offsets[side]
        for first in range(0, len(split), chunk):
            last = min(first + chunk, len(split))
            at = np.asarray(offsets[first:last + 1], dtype=np.int64)
            ids = np.asarray(split.ids[side][at[0]:at[-1]], dtype=np.int64)
            at = at - at[0]
            starts = self.starts[ids] | self.special[ids]
            starts[1:] |= self.special[ids[:-1]]
            starts[at[:-1][at[:-1] < len(ids)]] = True
            yield first, ids, at, np.append(np.flatnonzero(starts), len(ids))


def number_words(boundaries: WordBoundaries, split: Split, chunk: int = CHUNK
                 ) -> tuple[WordTypes, dict[str, np.ndarray]]:
    """Every word occurrence of both sides of ``split`` numbered, a chunk of sentences at a
    time: the distinct words (``WordTypes.words`` by number), and each side's numbers in
    the order of its occurrences (uint32)."""
    types = WordTypes(len(boundaries.starts))
    numbers = {side: np.concatenate([np.empty(0, np.uint32)] + [
        types.number(ids, bounds).astype(np.uint32) for _, ids, _, bounds in boundaries.chunks(split, side, chunk)])
        for side in SIDES}
    return types, numbers
