"""A word vocabulary: tokens to ids and back, with four fixed special ids.

It replaces torchtext's ``Vocab`` (torchtext is no longer maintained). Unlike the
Annotated Transformer, which built its vocabularies over train + validation + test,
a ``Vocab`` here is meant to be built from the training split only, so that words seen
only in held-out text are unknown to the model, as they would be in real use.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # index = id; SentencePiece models use the same pieces


class Vocab:
    """An ordered list of tokens; a token's id is its index.

    Ids 0..3 are always ``SPECIALS``. Build one with ``Vocab.build``; store it as
    ``state_dict()`` (a plain list of strings) and rebuild it with ``Vocab.from_state``.
    """

    def __init__(self, itos: Sequence[str]):
        itos = list(itos)
        if itos[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"a vocabulary must start with the special tokens {SPECIALS}, got {itos[:4]}")
        if len(set(itos)) != len(itos):
            raise ValueError("a vocabulary must not hold a token twice")
        self.itos = itos
        self.stoi = {token: i for i, token in enumerate(itos)}

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], min_freq: int = 2, max_size: int | None = None) -> "Vocab":
        """Count tokens and keep the frequent ones.

        Args:
            token_lists: tokenized sentences (of the training split).
            min_freq: keep tokens seen at least this often.
            max_size: the most tokens to keep, the four specials included; the most
                frequent win. None: no limit.

        Returns:
            The specials, then the kept tokens by descending frequency, ties in
            alphabetical order, so the same input always gives the same ids. A token
            spelled like a special (say ``"<unk>"`` in the text) is the special.
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be at least 1, got {min_freq}")
        if max_size is not None and max_size < len(SPECIALS):
            raise ValueError(f"max_size must be at least {len(SPECIALS)} (the special tokens), got {max_size}")
        counts = Counter(token for tokens in token_lists for token in tokens)
        for special in SPECIALS:
            counts.pop(special, None)
        kept = sorted((t for t, n in counts.items() if n >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[: max_size - len(SPECIALS)]
        return cls(SPECIALS + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``tokens``; a token not in the vocabulary is ``UNK_ID``."""
        return [self.stoi.get(token, UNK_ID) for token in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids``.

        Raises:
            ValueError: for an id outside the vocabulary (a negative one would
                otherwise silently index from the end).
        """
        tokens = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(f"id {i} is outside the vocabulary (size {len(self.itos)})")
            tokens.append(self.itos[i])
        return tokens

    def state_dict(self) -> list[str]:
        """The tokens in id order: a plain list, safe for ``torch.load(weights_only=True)``."""
        return list(self.itos)

    @classmethod
    def from_state(cls, state: Sequence[str]) -> "Vocab":
        return cls(state)
