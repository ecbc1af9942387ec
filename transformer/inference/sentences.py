"""What every decoding engine shares: sentences to batches and length limits, and the
text methods built on an engine's ``search``; sentences to ids (``encode``).

``Translator`` (this package's decoder) and ``CTranslate2Translator`` (an exported model)
both derive from ``SentenceTranslator``, so they batch, bound and return translations
alike and differ only in how they search.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from transformer.config import DecodeConfig
from transformer.data.tokenizers import Tokenizer

log = logging.getLogger(__name__)


class SentenceTranslator:
    """The engine-independent part of a translator.

    A subclass sets ``tokenizer``, ``cfg``, ``max_positions`` and ``device`` (a
    ``torch.device`` or a name such as "cpu" or "cuda:1") and defines
    ``search(sources, nbest, scores)``; it may change how an over-long source is cut
    (``_cut``).
    """

    tokenizer: Tokenizer
    cfg: DecodeConfig
    max_positions: int
    device: Any

    def encode(self, sentences: Sequence[str], first_line: int = 1) -> list[list[int]]:
        """Source ids of each sentence, cut (with a warning) to the model's limit; none
        for an empty sentence.

        ``first_line`` numbers the sentences in the warnings.
        """
        sources = []
        for n, sentence in enumerate(sentences, first_line):
            # An empty line stays empty (no ids, so it is not decoded), although a
            # tokenizer would encode it as a lone </s>.
            ids = self.tokenizer.encode_src(sentence) if sentence.strip() else []
            if len(ids) > self.max_positions:
                log.warning("line %d has %d tokens; cut to the model's limit of %d", n, len(ids), self.max_positions)
                ids = self._cut(ids)
            sources.append(ids)
        return sources

    def _cut(self, ids: list[int]) -> list[int]:
        """An over-long source within the model's limit: its first ``max_positions`` ids."""
        return ids[: self.max_positions]

    def search(self, sources: Sequence[list[int]], nbest: int | None = None, scores: bool = True) -> list[list[Any]]:
        raise NotImplementedError

    def _length_limits(self, lengths: Sequence[int]) -> list[int]:
        """Tokens to generate for each sentence: a·length + b, within the positional table."""
        cap = self.max_positions - 1  # the start symbol takes one position
        return [max(1, min(cap, int(self.cfg.max_len_a * n + self.cfg.max_len_b))) for n in lengths]

    def _batch_sentences(self) -> int:
        """Sentences in a batch, at most: ``batch_size``, and with beam search no more
        than ``batch_hypotheses`` hypotheses (by default 640 on a CPU, no limit elsewhere).

        On a CPU two workers decoded test2016 with beam 5 4-20% faster in batches of 128
        sentences than of 256, though one worker alone was not faster: smaller batches
        share the work between the workers more evenly (at 256 one batch of five held
        37% of it), and each step's logits are smaller (41 MB at 256 x 5 rows).
        """
        cfg = self.cfg
        hypotheses = cfg.batch_hypotheses
        if hypotheses is None:
            hypotheses = 640 if str(self.device).split(":")[0] == "cpu" else None
        if cfg.beam_size == 1 or hypotheses is None:
            return cfg.batch_size
        return max(1, min(cfg.batch_size, hypotheses // cfg.beam_size))

    def _batches(self, sources: Sequence[list[int]]) -> Iterator[list[int]]:
        """Indices of the non-empty sources, sorted by length and cut into batches of at
        most ``_batch_sentences()`` sentences and ``batch_tokens`` padded source tokens."""
        order = sorted((i for i, s in enumerate(sources) if s), key=lambda i: len(sources[i]))
        most = self._batch_sentences()
        batch: list[int] = []
        for i in order:
            # Sorted by length, so the newest source is the longest of the batch.
            full = len(batch) == most or (len(batch) + 1) * len(sources[i]) > self.cfg.batch_tokens
            if batch and full:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def translate_ids(self, sources: Sequence[list[int]]) -> list[list[int]]:
        """Decode source id lists (no padding) into target id lists (no specials)."""
        return [hyps[0].tokens for hyps in self.search(sources, nbest=1, scores=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        # A model can emit line breaks (e.g. through byte pieces); one input line must
        # stay one output line, so every kind of line break becomes a space.
        return " ".join(self.tokenizer.decode_tgt(ids).splitlines())

    def translate(self, sentences: Sequence[str], first_line: int = 1) -> list[str]:
        """Translate sentences; the output list matches the input one to one."""
        return [self.detokenize(ids) for ids in self.translate_ids(self.encode(sentences, first_line))]

    def translate_nbest(
        self, sentences: Sequence[str], nbest: int, first_line: int = 1
    ) -> list[list[tuple[str, float]]]:
        """The ``nbest`` best translations of each sentence with their scores, best first."""
        found = self.search(self.encode(sentences, first_line), nbest=nbest)
        return [[(self.detokenize(h.tokens), h.score) for h in hyps] for hyps in found]
