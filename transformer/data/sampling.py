"""Subword regularisation: the training pairs segmented anew every epoch.

A SentencePiece unigram model can segment a sentence in many ways. Training on one
sampled segmentation per epoch instead of the single best one (Kudo, 2018, "Subword
Regularization") shows the model each word spelled several ways, a regulariser that
helps most on small corpora. Validation, test and translation keep the best segmentation.

``data.sp_alpha`` is the smoothing of the segmentations' probabilities, as in
SentencePiece's ``encode(enable_sampling=True, alpha=..., nbest_size=-1)``: a
segmentation is drawn with probability proportional to ``exp(alpha * sum of its pieces'
scores)`` over all of them (smaller alpha: more varied, and longer, sentences).

The draws are a function of the run's seed, the epoch and each word's place in the split
(SplitMix64 at that index), so every process of a torchrun launch samples the same
segmentation, a resumed run the one the interrupted run would have (SentencePiece's own
sampler does not repeat across processes), and reading the split in chunks changes
nothing. The unigram model segments each word (a piece starting with "▁" and those up to
the next one) on its own, so a sentence's segmentation is one per word, drawn
independently: the sampler builds each distinct word's lattice once, then draws every
occurrence of every word of a chunk at once, piece by piece from the word's end (forward
filtering, backward sampling).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from transformer.data.batching import seeded_generator
from transformer.data.prepared import SIDES, Split
from transformer.data.tokenizers import SentencePieceTokenizer
from transformer.data.words import CHUNK, WordBoundaries, number_words

# Streams of a run's randomness (``seeded_generator``) used here: this offset plus the
# epoch, clear of the epochs' batch orders (1, 2, ...) and their loaders' (-1, -2, ...).
STREAM = 1 << 40
GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea and Flood, 2014) on uint64s: the generator's
    n-th output for seed k is ``splitmix64(k + n * GAMMA)``, so any one is drawn on its own."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _Pieces:
    """A vocabulary's pieces as characters, to find every piece spelled inside words.

    The substrings of a word are grown leftwards from each character: one of ``n``
    characters is kept growing while it ends some piece (its polynomial hash is among
    those of the pieces' last ``n`` characters), is looked up among the pieces of ``n``
    characters by its hash, and a hit is confirmed character by character.

    Args:
        pieces: each id's text; "" for an id that never spans a substring.
    """

    MULTIPLIERS = (0x100000001B3, 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)

    def __init__(self, pieces: list[str]):
        self.length = np.array([len(p) for p in pieces], dtype=np.int64)
        self.longest = int(self.length.max(initial=1))
        self.chars = np.zeros((len(pieces), self.longest), dtype=np.int64)
        for k, piece in enumerate(pieces):
            self.chars[k, :len(piece)] = [ord(c) for c in piece]
        for multiplier in self.MULTIPLIERS:  # one under which no two pieces of a length collide
            self.powers = [np.uint64(pow(multiplier, k, 1 << 64)) for k in range(self.longest)]
            self.pieces, self.endings = {}, {}  # by length: (hashes sorted, their ids); hashes
            hashes = np.zeros(len(pieces), dtype=np.uint64)  # of each piece's last n characters
            for n in range(1, self.longest + 1):
                ids = np.flatnonzero(self.length >= n)
                hashes[ids] += self.chars[ids, self.length[ids] - n].astype(np.uint64) * self.powers[n - 1]
                self.endings[n] = np.unique(hashes[ids])
                ids = np.flatnonzero(self.length == n)
                order = np.argsort(hashes[ids])
                self.pieces[n] = (hashes[ids][order], ids[order])
            if all(len(np.unique(h)) == len(h) for h, _ in self.pieces.values()):
                break
        else:
            raise RuntimeError("no multiplier hashes this vocabulary's pieces apart")

    def spans(self, pieces: np.ndarray, count: np.ndarray, plain: np.ndarray, start: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every edge of a block of words: (from node, to node, piece id).

        Args:
            pieces: the words' pieces, word after word (``count`` each).
            plain: the words made of normal pieces: their edges are every piece spelled
                by a substring; another word's are its own pieces, one after the other.
            start: each word's first node.
        """
        word = np.repeat(np.arange(len(count)), count)
        chain = ~plain[word]
        k = np.arange(len(pieces)) - (np.cumsum(count) - count)[word]  # the piece's place in its word
        froms, tos, ids = [start[word[chain]] + k[chain]], [start[word[chain]] + k[chain] + 1], [pieces[chain]]
        kept, word = pieces[~chain], word[~chain]
        n = self.length[kept]
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        chars = self.chars[np.repeat(kept, n), within]
        word = np.repeat(word, n)
        chars_in = np.bincount(word, minlength=len(count))
        position = np.arange(len(chars)) - (np.cumsum(chars_in) - chars_in)[word]  # in its word
        last = np.arange(len(chars))  # the growing substrings' last characters, and their hashes
        hashes = np.zeros(len(chars), dtype=np.uint64)
        for n in range(1, self.longest + 1):
            inside = position[last] >= n - 1
            last, hashes = last[inside], hashes[inside]
            hashes = hashes + chars[last - (n - 1)].astype(np.uint64) * self.powers[n - 1]
            endings = self.endings[n]
            ending = endings[np.minimum(np.searchsorted(endings, hashes), len(endings) - 1)] == hashes
            last, hashes = last[ending], hashes[ending]
            table, table_ids = self.pieces[n]
            if not len(table) or not len(last):
                continue
            at = np.minimum(np.searchsorted(table, hashes), len(table) - 1)
            hit = np.flatnonzero(table[at] == hashes)
            piece = table_ids[at[hit]]
            same = (chars[(last[hit] - (n - 1))[:, None] + np.arange(n)] == self.chars[piece, :n]).all(axis=1)
            hit, piece = hit[same], piece[same]
            end = start[word[last[hit]]] + position[last[hit]] + 1
            froms.append(end - n)
            tos.append(end)
            ids.append(piece)
        return tuple(np.concatenate(parts) for parts in (froms, tos, ids))


class Lattices:
    """Every segmentation of a set of words, for drawing segmentations by their probability.

    Word ``w`` (a tuple of piece ids: its best segmentation) has nodes ``start[w]`` to
    ``end[w]``, one per character boundary; each edge is a piece spanning a substring,
    stored with the edges ending at the same node, in node order. A word holding a piece
    other than a normal one (``<s>``, a byte, ``<unk>``) keeps its best segmentation.

    Args:
        tokenizer: the unigram SentencePiece model.
        words: the words, each as its best segmentation.
        alpha: the smoothing (``data.sp_alpha``).
    """

    def __init__(self, tokenizer: SentencePieceTokenizer, words: list[tuple[int, ...]], alpha: float,
                 block: int = 1 << 17):
        sp = tokenizer.sp
        n = sp.get_piece_size()
        normal = np.array([not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))
                           for i in range(n)])
        score = alpha * np.array([sp.get_score(i) for i in range(n)])
        vocab = _Pieces([sp.id_to_piece(i) if normal[i] else "" for i in range(n)])
        pieces = np.fromiter(itertools.chain.from_iterable(words), dtype=np.int64)
        count = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        # A word of normal pieces has a node per character boundary; another, one per piece.
        offset = np.cumsum(count) - count
        plain = np.logical_and.reduceat(normal[pieces], offset) if len(pieces) else np.ones(0, dtype=bool)
        length = np.where(plain, np.add.reduceat(vocab.length[pieces], offset) if len(pieces) else 0, count)
        self.start = np.cumsum(length + 1) - (length + 1)
        node = int(self.start[-1] + length[-1] + 1) if len(words) else 0
        self.end = self.start + length
        # Every edge (from, to, piece), in blocks of words so the temporaries stay bounded.
        froms, tos, ids = [], [], []
        for w in range(0, len(words), block):
            at = slice(offset[w], offset[w] + count[w:w + block].sum())
            spans = vocab.spans(pieces[at], count[w:w + block], plain[w:w + block], self.start[w:w + block])
            for out, part in zip((froms, tos, ids), spans):
                out.append(part)
        # Node numbers in 4 bytes while they fit, ids in 2: the edges are most of the memory.
        index = np.int32 if node < 1 << 31 else np.int64
        a, b, i = (np.concatenate([np.empty(0, dtype)] + parts).astype(dtype, copy=False) for parts, dtype in (
            (froms, index), (tos, index), (ids, np.uint16 if n <= 1 << 16 else np.int32)))
        del froms, tos, ids
        # By end node, then start node (a piece's length is at most vocab.longest): the order
        # the forward pass takes them in.
        order = np.argsort(b * np.int64(vocab.longest + 1) + (vocab.longest - (b - a)), kind="stable")
        a, b, i = a[order], b[order], i[order]
        del order
        # Forward: log of the summed weight of the paths from each word's start to each node,
        # node position by node position for all words at once, and at each node over its
        # edges in order (a left fold of logaddexp: one path's weight, then the next's, ...).
        reach = np.full(node, -np.inf)
        reach[self.start] = 0.0
        position = (np.arange(node) - np.repeat(self.start, length + 1))[b]  # the end node's, in its word
        if position.max(initial=0) < 1 << 16:
            position = position.astype(np.uint16)  # numpy sorts 16-bit integers by radix
        by = np.argsort(position, kind="stable")  # still by end node within a position
        at = np.searchsorted(position[by], np.arange(int(position.max(initial=0)) + 2))
        edge_score = score[i]
        froms, ends, scores = a[by], b[by], edge_score[by]
        for p in range(1, len(at) - 1):
            edges = slice(at[p], at[p + 1])
            if at[p] < at[p + 1]:
                heads = np.flatnonzero(np.diff(ends[edges], prepend=-1))
                reach[ends[edges][heads]] = np.logaddexp.reduceat(reach[froms[edges]] + scores[edges], heads)
        del froms, ends, scores
        live = reach[a] > -np.inf  # an edge from a node no path reaches is never drawn
        a, b, i, edge_score = a[live], b[live], i[live], edge_score[live]
        weight = reach[a] + edge_score - reach[b]
        # The edges ending at each node, together, their probabilities (summing to 1)
        # cumulated: the edge drawn at a node is its first whose sum exceeds a uniform draw.
        cum = np.cumsum(np.exp(weight))
        ending = np.bincount(b, minlength=node)
        first = np.cumsum(ending) - ending  # each node's first edge
        self.within = np.minimum(cum - np.where(first[b] > 0, cum[first[b] - 1], 0.0), 1.0)
        self.within[np.append(b[1:] != b[:-1], True)[:len(b)]] = 1.0  # each node's last edge
        self.first = first.astype(np.int32 if len(b) < 1 << 31 else np.int64)
        self.edge_from, self.edge_id = a, i

    def sample(self, words: np.ndarray, key: np.uint64, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """One segmentation of each word of ``words`` (indices): its pieces' count per word
        and all the pieces, word after word.

        The uniform numbers come from ``key`` and each word's place: word ``k`` of
        ``words`` is number ``first + k``, and its draw at step ``s`` (its ``s``-th piece
        from the end) is SplitMix64's output at an index made of the two. A word's
        segmentation so depends on the key and its number alone, not on the words drawn
        beside it.
        """
        at, stop = self.end[words], self.start[words]
        live = np.flatnonzero(at != stop)  # the words still drawing, and their state:
        at, stop, number = at[live], stop[live], live.astype(np.uint64) + np.uint64(first)
        drawn: list[tuple[np.ndarray, np.ndarray]] = []  # step by step: (words, their pieces)
        step = 0
        while len(live):
            uniform = (splitmix64(key + (number | np.uint64(step << 40)) * GAMMA) >> np.uint64(11)) * 2.0**-53
            edge = self.first[at]
            on = np.flatnonzero(self.within[edge] <= uniform)
            while len(on):  # a few edges end at a node: walk them
                edge[on] += 1
                on = on[self.within[edge[on]] <= uniform[on]]
            drawn.append((live, self.edge_id[edge]))
            at = self.edge_from[edge]
            going = at != stop
            live, at, stop, number = live[going], at[going], stop[going], number[going]
            step += 1
        count = np.bincount(np.concatenate([np.empty(0, np.int64)] + [w for w, _ in drawn]), minlength=len(words))
        ends = np.cumsum(count)
        out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
        for step, (live, piece) in enumerate(drawn):  # drawn from each word's end
            out[ends[live] - 1 - step] = piece
        return count, out


class Resegmenter:
    """Each epoch's sampled segmentation of a training split.

    In memory: each word occurrence's type (2 or 4 bytes), each distinct word's lattice,
    and the epoch's sampled ids (the split's id type); the word boundaries are found
    again from the split's ids each epoch. The split is read and sampled a chunk of
    sentences at a time, so the temporaries stay bounded at any corpus size.

    Args:
        tokenizer: the unigram SentencePiece model that made the split's ids.
        split: the training split, segmented the best way.
        alpha: the smoothing (``data.sp_alpha``).
        max_len: a sampled side longer than this many tokens (specials aside) keeps
            its best segmentation, so batches stay within the limits the config checks.
        chunk: sentences read and sampled at once (the result does not depend on it).
    """

    def __init__(self, tokenizer: SentencePieceTokenizer, split: Split, alpha: float, max_len: int,
                 chunk: int = CHUNK):
        self.split, self.max_len, self.chunk = split, max_len, chunk
        self.boundaries = WordBoundaries(tokenizer)
        types, words = number_words(self.boundaries, split, chunk)
        small = np.uint16 if len(types.words) <= 1 << 16 else np.uint32
        self.words = {side: numbers.astype(small, copy=False) for side, numbers in words.items()}
        self.occurrences = sum(map(len, self.words.values()))
        self.lattices = Lattices(tokenizer, types.words, alpha)

    def epoch(self, seed: int, epoch: int) -> Split:
        """The split of epoch ``epoch`` (0-based) of a run seeded with ``seed``."""
        draw = torch.randint(0, 2**63 - 1, (), generator=seeded_generator(seed, STREAM + epoch))
        ids, offsets = {}, {}
        for number, side in enumerate(SIDES):
            key = splitmix64(np.array([int(draw) + number], dtype=np.uint64))[0]
            specials = 1 if side == "src" else 2  # </s>; <s> and </s>
            parts, lengths, done = [], [], 0
            for _, best, at, bounds in self.boundaries.chunks(self.split, side, self.chunk):
                words = self.words[side][done:done + len(bounds) - 1].astype(np.int64)
                sampled, pieces = self.lattices.sample(words, key, done)
                done += len(words)
                length = np.diff(bounds)
                sentence = np.searchsorted(at, bounds[:-1], side="right") - 1
                too_long = np.bincount(sentence, weights=sampled, minlength=len(at) - 1) - specials > self.max_len
                kept = too_long[sentence]
                count = np.where(kept, length, sampled)
                out = pieces.astype(self.split.ids[side].dtype)
                if kept.any():  # each word's pieces: its sampled ones, or its best ones in a sentence too long
                    within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
                    new = np.repeat(~kept, count)
                    source = np.where(new, np.repeat(np.cumsum(sampled) - sampled, count),
                                      np.repeat(bounds[:-1], count)) + within
                    out = np.empty(len(source), dtype=self.split.ids[side].dtype)
                    out[new] = pieces[source[new]]
                    out[~new] = best[source[~new]]
                parts.append(out)
                lengths.append(np.bincount(sentence, weights=count, minlength=len(at) - 1).astype(np.int64))
            ids[side] = np.concatenate([np.empty(0, dtype=self.split.ids[side].dtype)] + parts)
            offsets[side] = np.concatenate([[0], np.cumsum(np.concatenate([np.empty(0, np.int64)] + lengths))])
        return Split(self.split.name, ids, offsets)
