"""Subword regularisation: the training pairs segmented anew every epoch.

A SentencePiece model can segment a sentence in many ways. Training on one sampled
segmentation per epoch instead of the single best one (Kudo, 2018, "Subword
Regularization"; BPE-dropout for BPE models) shows the model each word spelled several
ways, a regulariser that helps most on small corpora. Validation, test and translation
keep the best segmentation.

``data.sp_alpha`` sets the sampling: for a unigram model the smoothing of the
segmentations' probabilities (over all segmentations; smaller: more varied, and longer,
sentences), for a BPE model the probability that a merge is dropped (1 or more: characters).

SentencePiece draws the samples from its own generator. Seeded before each epoch, it
repeats an epoch's segmentation within one process, but not in another one (measured
with sentencepiece 0.2.x): the processes of a torchrun launch would disagree on the
epoch's batches, so several processes are refused; and a resumed run samples other
segmentations than the interrupted one would have, so it trains on other batches from
there on (a warning says so).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from transformer.data.batching import seeded_generator
from transformer.data.prepared import SIDES, Split
from transformer.data.tokenizers import SentencePieceTokenizer

# Streams of a run's randomness (``seeded_generator``) used here: this offset plus the
# epoch, clear of the epochs' batch orders (1, 2, ...) and their loaders' (-1, -2, ...).
STREAM = 1 << 40


class Resegmenter:
    """Each epoch's sampled segmentation of a training split.

    The split's text is decoded from its ids once and held in memory (a few bytes a
    character: meant for corpora of up to a few million pairs). An epoch's segmentation
    is drawn from the run's seed and the epoch (reproducible within a process only, above).

    Args:
        tokenizer: the SentencePiece model that made the split's ids.
        split: the training split, segmented the best way.
        alpha: SentencePiece's sampling parameter (``data.sp_alpha``).
        max_len: a sampled side longer than this many tokens (specials aside) keeps
            its best segmentation, so batches stay within the limits the config checks.
    """

    def __init__(self, tokenizer: SentencePieceTokenizer, split: Split, alpha: float, max_len: int):
        self.sp, self.split, self.alpha, self.max_len = tokenizer.sp, split, alpha, max_len
        self.bos_id, self.eos_id = tokenizer.bos_id, tokenizer.eos_id
        # Both sides in one list (sources, then targets); SentencePiece skips <s> and </s>.
        sources, targets = zip(*(split.pair(i) for i in range(len(split)))) if len(split) else ((), ())
        self.text = self.sp.decode([*sources, *targets])

    def epoch(self, seed: int, epoch: int) -> Split:
        """The split of epoch ``epoch`` (0-based) of a run seeded with ``seed``."""
        import sentencepiece as spm

        draw = torch.randint(0, 2**32, (), generator=seeded_generator(seed, STREAM + epoch))
        spm.set_random_generator_seed(int(draw))
        # One thread: each batch call runs in a fresh thread whose generator starts from
        # the seed just set.
        pieces = self.sp.encode(self.text, enable_sampling=True, alpha=self.alpha, nbest_size=-1, num_threads=1)
        n = len(self.split)
        sides = {"src": ([], [self.eos_id]), "tgt": ([self.bos_id], [self.eos_id])}
        ids, offsets = {}, {}
        for k, side in enumerate(SIDES):
            before, after = sides[side]
            sentences = [
                before + p + after if len(p) <= self.max_len else self.split.pair(i)[k]
                for i, p in enumerate(pieces[k * n:(k + 1) * n])
            ]
            lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=n)
            offsets[side] = np.concatenate([[0], np.cumsum(lengths)])
            total = int(offsets[side][-1])
            ids[side] = np.fromiter(itertools.chain.from_iterable(sentences), dtype=self.split.ids[side].dtype,
                                    count=total)
        return Split(self.split.name, ids, offsets)
