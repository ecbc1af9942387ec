"""Translation quality: sacreBLEU with its signature, chrF, and lowercased tokenized BLEU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF


@dataclass
class Scores:
    bleu: float  # sacreBLEU: cased, 13a tokenization, on detokenized text
    bleu_signature: str
    chrf: float
    bleu_lc: float  # lowercased, 13a-tokenized BLEU, closer to older (tokenized, lowercased) reports
    bleu_lc_signature: str

    def summary(self) -> str:
        return (
            f"BLEU {self.bleu:.2f} ({self.bleu_signature}), chrF {self.chrf:.2f}, "
            f"lowercased BLEU {self.bleu_lc:.2f} ({self.bleu_lc_signature})"
        )


def score(hypotheses: Sequence[str], references: Sequence[str]) -> Scores:
    """Corpus scores of detokenized hypotheses against one reference each."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    refs = [list(references)]
    bleu, bleu_lc, chrf = BLEU(), BLEU(lowercase=True), CHRF()
    b = bleu.corpus_score(list(hypotheses), refs)
    lc = bleu_lc.corpus_score(list(hypotheses), refs)
    c = chrf.corpus_score(list(hypotheses), refs)
    return Scores(b.score, str(bleu.get_signature()), c.score, lc.score, str(bleu_lc.get_signature()))
