"""Tokenizers: text to ids on the source side, ids back to text on the target side.

A tokenizer knows its special ids and vocabulary sizes, and turns itself into a plain
dict (``state_dict``) that checkpoints carry, so translation needs no other file.
``tokenizer_from_state`` rebuilds one from such a dict.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence


class Tokenizer(Protocol):
    """What the model-building, decoding and checkpoint code needs from a tokenizer."""

    kind: str
    pad_id: int
    bos_id: int
    eos_id: int | None  # None: no end symbol, decoding runs to its length limit
    src_vocab_size: int
    tgt_vocab_size: int
    shared_vocab: bool  # one vocabulary for both sides (needed to tie embeddings)

    def encode_src(self, text: str) -> list[int]: ...

    def decode_tgt(self, ids: Sequence[int]) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...


class IdTokenizer:
    """The copy task's "tokenizer": the text is the ids, separated by spaces.

    Id 0 is padding; 1..vocab_size-1 are the symbols. As in the article, 1 also serves
    as the start symbol the decoder is fed first; there is no end symbol, so a
    sequence is decoded to the length of its source.
    """

    kind = "ids"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.pad_id, self.bos_id, self.eos_id = 0, 1, None
        self.src_vocab_size = self.tgt_vocab_size = vocab_size
        self.shared_vocab = True

    def encode_src(self, text: str) -> list[int]:
        ids = []
        for token in text.split():
            if not token.isdigit() or not 1 <= int(token) < self.vocab_size:
                raise ValueError(
                    f"'{token}' is not a symbol of the copy task: expected ids 1..{self.vocab_size - 1} "
                    f"separated by spaces"
                )
            ids.append(int(token))
        return ids

    def decode_tgt(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "IdTokenizer":
        return cls(state["vocab_size"])


_KINDS = {IdTokenizer.kind: IdTokenizer}


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its ``state_dict``."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in _KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r} (known: {', '.join(sorted(_KINDS))})")
    return _KINDS[kind].from_state(state)
