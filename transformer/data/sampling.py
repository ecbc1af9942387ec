"""Subword regularisation: the training pairs segmented anew every epoch.

A SentencePiece unigram model can segment a sentence in many ways. Training on one
sampled segmentation per epoch instead of the single best one (Kudo, 2018, "Subword
Regularization") shows the model each word spelled several ways, a regulariser that
helps most on small corpora. Validation, test and translation keep the best segmentation.

``data.sp_alpha`` is the smoothing of the segmentations' probabilities, as in
SentencePiece's ``encode(enable_sampling=True, alpha=..., nbest_size=-1)``: a
segmentation is drawn with probability proportional to ``exp(alpha * sum of its pieces'
scores)`` over all of them (smaller alpha: more varied, and longer, sentences).

The draws come from our own generator, seeded by the run's seed and the epoch, so every
process of a torchrun launch samples the same segmentation, and a resumed run the one the
interrupted run would have (SentencePiece's own sampler does not repeat across processes).
The unigram model segments each word (a piece starting with "▁" and those up to the next
one) on its own, so a sentence's segmentation is one per word, drawn independently: the
sampler builds each distinct word's lattice once, then draws every occurrence of every
word at once, piece by piece from the word's end (forward filtering, backward sampling).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from transformer.data.batching import seeded_generator
from transformer.data.prepared import SIDES, Split
from transformer.data.tokenizers import SentencePieceTokenizer

# Streams of a run's randomness (``seeded_generator``) used here: this offset plus the
# epoch, clear of the epochs' batch orders (1, 2, ...) and their loaders' (-1, -2, ...).
STREAM = 1 << 40
WORD_START = "\u2581"


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

    def __init__(self, tokenizer: SentencePieceTokenizer, words: list[tuple[int, ...]], alpha: float):
        sp = tokenizer.sp
        n = sp.get_piece_size()
        pieces = [sp.id_to_piece(i) for i in range(n)]
        normal = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i)) for i in range(n)]
        vocab = {p: i for i, p in enumerate(pieces) if normal[i]}
        score = [alpha * sp.get_score(i) for i in range(n)]
        longest = max(map(len, vocab), default=1)
        self.start = np.zeros(len(words), dtype=np.int64)
        ends, froms, ids, weights = [], [], [], []
        node = 0
        for w, word in enumerate(words):
            self.start[w] = node
            if all(normal[i] for i in word):
                text = "".join(pieces[i] for i in word)
                spans = [(a, b, vocab[text[a:b]]) for b in range(1, len(text) + 1)
                         for a in range(max(0, b - longest), b) if text[a:b] in vocab]
            else:  # one path, one node per piece: its best segmentation
                spans = [(k, k + 1, i) for k, i in enumerate(word)]
            length = spans[-1][1]
            # Forward: log of the summed weight of the paths from the start to each node.
            reach = [0.0] + [-math.inf] * length
            for a, b, i in spans:  # ordered by end node
                x, y = reach[b], reach[a] + score[i]
                reach[b] = max(x, y) + math.log1p(math.exp(-abs(x - y))) if x > -math.inf else y
            for a, b, i in spans:
                if reach[a] > -math.inf:  # an edge from a node no path reaches is never drawn
                    ends.append(node + b)
                    froms.append(node + a)
                    ids.append(i)
                    weights.append(reach[a] + score[i] - reach[b])
            node += length + 1
        self.end = np.append(self.start[1:], node) - 1
        # The edges ending at each node, their probabilities summing to 1, cumulated and
        # shifted by the node: one sorted array in which node + u (u uniform in [0, 1))
        # finds the edge drawn at that node.
        end = np.asarray(ends, dtype=np.int64)
        cum = np.cumsum(np.exp(np.asarray(weights)))
        first = np.searchsorted(end, end, side="left")
        within = np.minimum(cum - np.where(first > 0, cum[first - 1], 0.0), 1.0)
        within[np.append(end[1:] != end[:-1], True)[:len(end)]] = 1.0  # each node's last edge
        self.key = end + within
        self.edge_from = np.asarray(froms, dtype=np.int64)
        self.edge_id = np.asarray(ids, dtype=np.int64)

    def sample(self, words: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One segmentation of each word of ``words`` (indices): its pieces' count per word
        and all the pieces, word after word."""
        at = self.end[words].copy()
        stop = self.start[words]
        count = np.zeros(len(words), dtype=np.int64)
        drawn: list[tuple[np.ndarray, np.ndarray]] = []  # step by step: (words, their pieces)
        live = np.flatnonzero(at != stop)
        while len(live):
            edge = np.searchsorted(self.key, at[live] + rng.random(len(live)), side="right")
            drawn.append((live, self.edge_id[edge]))
            at[live] = self.edge_from[edge]
            count[live] += 1
            live = live[at[live] != stop[live]]
        ends = np.cumsum(count)
        out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
        for step, (live, piece) in enumerate(drawn):  # drawn from each word's end
            out[ends[live] - 1 - step] = piece
        return count, out


class Resegmenter:
    """Each epoch's sampled segmentation of a training split.

    The split's words and their lattices are held in memory (tens of bytes per word
    occurrence and per lattice edge: meant for corpora of up to a few million pairs).

    Args:
        tokenizer: the unigram SentencePiece model that made the split's ids.
        split: the training split, segmented the best way.
        alpha: the smoothing (``data.sp_alpha``).
        max_len: a sampled side longer than this many tokens (specials aside) keeps
            its best segmentation, so batches stay within the limits the config checks.
    """

    def __init__(self, tokenizer: SentencePieceTokenizer, split: Split, alpha: float, max_len: int):
        self.split, self.max_len = split, max_len
        sp = tokenizer.sp
        starts = np.array([sp.id_to_piece(i).startswith(WORD_START) for i in range(sp.get_piece_size())])
        special = np.array([sp.is_control(i) for i in range(sp.get_piece_size())])
        types: dict[tuple[int, ...], int] = {}
        self.words, self.word_first, self.word_length, self.word_sentence = {}, {}, {}, {}
        for side in SIDES:
            ids = np.asarray(split.ids[side], dtype=np.int64)
            offsets = np.asarray(split.offsets[side])
            # A word begins at a piece with "▁", at a sentence's start, and at and after a special.
            first = starts[ids] | special[ids]
            first[1:] |= special[ids[:-1]]
            first[offsets[:-1][offsets[:-1] < len(ids)]] = True
            bounds = np.append(np.flatnonzero(first), len(ids))
            flat = ids.tolist()
            self.words[side] = np.fromiter(
                (types.setdefault(tuple(flat[a:b]), len(types)) for a, b in itertools.pairwise(bounds)),
                dtype=np.int64, count=len(bounds) - 1)
            self.word_first[side], self.word_length[side] = bounds[:-1], np.diff(bounds)
            self.word_sentence[side] = np.searchsorted(offsets, bounds[:-1], side="right") - 1
        self.lattices = Lattices(tokenizer, list(types), alpha)

    def epoch(self, seed: int, epoch: int) -> Split:
        """The split of epoch ``epoch`` (0-based) of a run seeded with ``seed``."""
        draw = torch.randint(0, 2**63 - 1, (), generator=seeded_generator(seed, STREAM + epoch))
        rng = np.random.default_rng(int(draw))
        n = len(self.split)
        ids, offsets = {}, {}
        for side in SIDES:
            words, sentence = self.words[side], self.word_sentence[side]
            sampled, pieces = self.lattices.sample(words, rng)
            specials = 1 if side == "src" else 2  # </s>; <s> and </s>
            too_long = np.bincount(sentence, weights=sampled, minlength=n) - specials > self.max_len
            best = too_long[sentence]
            count = np.where(best, self.word_length[side], sampled)
            # Each word's pieces: its sampled ones, or its best ones in a sentence too long.
            within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
            keep = np.repeat(~best, count)
            source = np.where(keep, np.repeat(np.cumsum(sampled) - sampled, count),
                              np.repeat(self.word_first[side], count)) + within
            out = np.empty(len(source), dtype=self.split.ids[side].dtype)
            out[keep] = pieces[source[keep]]
            out[~keep] = np.asarray(self.split.ids[side])[source[~keep]]
            ids[side] = out
            offsets[side] = np.concatenate([[0], np.cumsum(np.bincount(sentence, weights=count, minlength=n))]
                                           ).astype(np.int64)
        return Split(self.split.name, ids, offsets)
