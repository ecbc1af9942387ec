"""Tokenizers: text to ids on the source side, ids back to text on the target side.

A tokenizer knows its special ids and vocabulary sizes, and turns itself into a plain
dict (``state_dict``) that checkpoints carry, so translation needs no other file.
``tokenizer_from_state`` rebuilds one from such a dict.

Three kinds:

* ``IdTokenizer`` ("ids"): the copy task's, where the text is the ids.
* ``SentencePieceTokenizer`` ("sentencepiece"): one joint subword model for both
  languages, learned on the training text.
* ``SpacyTokenizer`` ("spacy"): the Annotated Transformer's way, spaCy's rule-based word
  tokenizers with one word vocabulary per language.

The translation tokenizers share the special ids of ``transformer.data.vocab``:
padding 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3. ``TOKENIZERS`` is the one registry of
kinds: ``learn_tokenizer`` learns the kind ``data.tokenizer`` names, and
``tokenizer_from_state`` rebuilds any kind from a checkpoint.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from transformer.config import ConfigError, DataConfig
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, Vocab


class Tokenizer(Protocol):
    """What the model-building, decoding and checkpoint code needs from a tokenizer."""

    kind: str
    pad_id: int
    bos_id: int
    eos_id: int | None  # None: no end symbol, decoding runs to its length limit
    src_vocab_size: int
    tgt_vocab_size: int
    shared_vocab: bool  # one vocabulary for both sides (needed to tie embeddings)

    def encode_src(self, text: str) -> list[int]:
        """Source ids, ending with ``</s>`` where there is one."""
        ...

    def encode_tgt(self, text: str) -> list[int]:
        """Target ids for training: ``<s>`` first, ``</s>`` last where there is one."""
        ...

    def decode_tgt(self, ids: Sequence[int]) -> str:
        """Text of target ids given without ``<s>`` and ``</s>``."""
        ...

    def pieces(self, ids: Sequence[int], side: str) -> list[str]:
        """The token string of each id, specials included, on ``side`` "src" or "tgt"
        (labels for attention pictures)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (str, int, bytes, lists, dicts): a checkpoint is read
        with ``torch.load(weights_only=True)``."""
        ...


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

    def encode_tgt(self, text: str) -> list[int]:
        return [self.bos_id] + self.encode_src(text)  # no end symbol to append

    def decode_tgt(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def pieces(self, ids: Sequence[int], side: str) -> list[str]:
        return [str(int(i)) for i in ids]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "IdTokenizer":
        return cls(state["vocab_size"])


class SentencePieceTokenizer:
    """One SentencePiece model for both languages (so embeddings can be tied).

    Its state is the serialized model itself, so a checkpoint needs no ``.model`` file.
    With byte fallback (the default) a character never seen in training is spelled as
    its UTF-8 bytes instead of becoming ``<unk>``, so any text encodes and decodes.

    Args:
        model: a serialized SentencePiece model whose pad/bos/eos/unk ids are 0/1/2/3.
    """

    kind = "sentencepiece"
    # Fixed, so the model bytes depend only on the input: SentencePiece records the
    # thread count in the model, and its unigram training differs with it.
    NUM_THREADS = 2

    def __init__(self, model: bytes):
        import sentencepiece as spm

        self.model = bytes(model)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model)
        ids = (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id())
        if ids != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise ValueError(f"SentencePiece model has pad/bos/eos/unk ids {ids}, expected (0, 1, 2, 3)")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID
        self.src_vocab_size = self.tgt_vocab_size = self.sp.get_piece_size()
        self.shared_vocab = True

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        vocab_size: int = 8000,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        byte_fallback: bool = True,
    ) -> "SentencePieceTokenizer":
        """Learn a joint model in memory from ``sentences`` (both languages' training text).

        Deterministic: the same sentences and arguments give the same model bytes.
        ``vocab_size`` is a hard limit, so the model has exactly that many pieces
        (SentencePiece's ``hard_vocab_limit=False`` would silently make a smaller one;
        we prefer an error to a model size other than the one configured). With byte
        fallback, 256 byte pieces and every character of the corpus count towards it.

        Raises:
            ValueError: when ``vocab_size`` does not fit the corpus (too large for
                its text, or too small for its characters), naming a size that fits.
        """
        import sentencepiece as spm

        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                byte_fallback=byte_fallback,
                pad_id=PAD_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                pad_piece=SPECIALS[PAD_ID],
                bos_piece=SPECIALS[BOS_ID],
                eos_piece=SPECIALS[EOS_ID],
                unk_piece=SPECIALS[UNK_ID],
                num_threads=cls.NUM_THREADS,
                minloglevel=2,  # errors only: training otherwise logs hundreds of lines
            )
        except RuntimeError as e:
            raise ValueError(_explain_sentencepiece_error(str(e), vocab_size)) from e
        return cls(model.getvalue())

    @classmethod
    def learn(cls, pairs: Sequence[tuple[str, str]], cfg: DataConfig) -> "SentencePieceTokenizer":
        """One joint model from both sides of the training pairs."""
        text = [s for s, _ in pairs] + [t for _, t in pairs]
        return cls.train(text, vocab_size=cfg.vocab_size, model_type=cfg.sp_model_type)

    def encode_src(self, text: str) -> list[int]:
        return self.sp.encode(text) + [self.eos_id]

    def encode_tgt(self, text: str) -> list[int]:
        return [self.bos_id] + self.sp.encode(text) + [self.eos_id]

    def decode_tgt(self, ids: Sequence[int]) -> str:
        # SentencePiece skips control pieces (<pad>, <s>, </s>) itself when decoding.
        return self.sp.decode([int(i) for i in ids])

    def pieces(self, ids: Sequence[int], side: str) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]  # one vocabulary for both sides

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "SentencePieceTokenizer":
        return cls(state["model"])


def _explain_sentencepiece_error(message: str, vocab_size: int) -> str:
    """A SentencePiece training error in terms of this project's config."""
    if too_high := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        return (
            f"SentencePiece vocabulary size {vocab_size} is too large for this training corpus "
            f"(at most {too_high[1]} pieces can be learned from it): set a smaller data.vocab_size"
        )
    if too_low := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return (
            f"SentencePiece vocabulary size {vocab_size} is too small for this training corpus: its characters, "
            f"the special tokens and the 256 byte pieces need {too_low[1]}; set a larger data.vocab_size"
        )
    if "!sentences_.empty()" in message:
        return "SentencePiece got no training sentences: the training corpus is empty"
    return f"SentencePiece training failed: {message}"


# spaCy's blank pipelines, one per language: spaCy is slow to import and a pipeline
# takes a moment to build, so each is made once per process, on first use.
_BLANK: dict[str, Any] = {}


def _blank(lang: str) -> Any:
    if lang not in _BLANK:
        import spacy

        try:
            _BLANK[lang] = spacy.blank(lang)
        except ImportError as e:  # spaCy's error for a language code it does not know
            raise ValueError(f"spaCy has no tokenizer for language {lang!r}") from e
    return _BLANK[lang]


def spacy_words(text: str, lang: str) -> list[str]:
    """Words of ``text`` by spaCy's rule-based tokenizer for ``lang`` (no model needed).

    Only the tokenizer runs, not a pipeline. spaCy makes tokens of runs of extra
    whitespace; those are dropped.
    """
    return [t.text for t in _blank(lang).tokenizer(text) if not t.is_space]


_NO_SPACE_BEFORE = {",", ".", "!", "?", ";", ":", ")", "n't"}


def detokenize(tokens: Sequence[str]) -> str:
    """Join words into text: a tiny rule-based inverse of spaCy's English tokenizer.

    Words are joined with spaces, except before ``, . ! ? ; : )``, clitics (a word
    starting with ``'``, such as ``'s``, and ``n't``) and after ``(``. Quotes and other
    cases are left spaced: sacreBLEU tokenizes them again anyway.
    """
    text = ""
    for i, token in enumerate(tokens):
        glued = i == 0 or token in _NO_SPACE_BEFORE or token.startswith("'") or tokens[i - 1] == "("
        text += token if glued else " " + token
    return text


class SpacyTokenizer:
    """spaCy word tokenizers with one vocabulary per language, as in the Annotated Transformer.

    Args:
        src_vocab, tgt_vocab: the word vocabularies (see ``SpacyTokenizer.build``).
        src_lang, tgt_lang: spaCy language codes of the tokenizers.
        min_freq: recorded with the state; the vocabularies already reflect it.
    """

    kind = "spacy"

    def __init__(
        self, src_vocab: Vocab, tgt_vocab: Vocab, src_lang: str = "de", tgt_lang: str = "en", min_freq: int = 2
    ):
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.src_lang, self.tgt_lang, self.min_freq = src_lang, tgt_lang, min_freq
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID
        self.src_vocab_size, self.tgt_vocab_size = len(src_vocab), len(tgt_vocab)
        self.shared_vocab = False

    @classmethod
    def build(
        cls, pairs: Iterable[tuple[str, str]], min_freq: int = 2, src_lang: str = "de", tgt_lang: str = "en"
    ) -> "SpacyTokenizer":
        """Build both vocabularies from ``pairs`` (the training split only).

        The reference built them over train + validation + test; here words seen only
        outside training are ``<unk>``, as they would be for new text.
        """
        src_words, tgt_words = [], []
        for src, tgt in pairs:
            src_words.append(spacy_words(src, src_lang))
            tgt_words.append(spacy_words(tgt, tgt_lang))
        return cls(
            Vocab.build(src_words, min_freq), Vocab.build(tgt_words, min_freq), src_lang, tgt_lang, min_freq
        )

    @classmethod
    def learn(cls, pairs: Sequence[tuple[str, str]], cfg: DataConfig) -> "SpacyTokenizer":
        return cls.build(pairs, min_freq=cfg.min_freq, src_lang=cfg.src_lang, tgt_lang=cfg.tgt_lang)

    def encode_src(self, text: str) -> list[int]:
        return self.src_vocab.encode(spacy_words(text, self.src_lang)) + [self.eos_id]

    def encode_tgt(self, text: str) -> list[int]:
        return [self.bos_id] + self.tgt_vocab.encode(spacy_words(text, self.tgt_lang)) + [self.eos_id]

    def decode_tgt(self, ids: Sequence[int]) -> str:
        # Padding, <s> and </s> are dropped, as SentencePiece does; <unk> stays visible.
        words = self.tgt_vocab.decode(i for i in ids if int(i) not in (self.pad_id, self.bos_id, self.eos_id))
        return detokenize(words)

    def pieces(self, ids: Sequence[int], side: str) -> list[str]:
        return (self.src_vocab if side == "src" else self.tgt_vocab).decode(ids)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "src_lang": self.src_lang,
            "tgt_lang": self.tgt_lang,
            "src_vocab": self.src_vocab.state_dict(),
            "tgt_vocab": self.tgt_vocab.state_dict(),
            "min_freq": self.min_freq,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "SpacyTokenizer":
        return cls(
            Vocab.from_state(state["src_vocab"]),
            Vocab.from_state(state["tgt_vocab"]),
            state["src_lang"],
            state["tgt_lang"],
            state["min_freq"],
        )


TOKENIZERS = {cls.kind: cls for cls in (IdTokenizer, SentencePieceTokenizer, SpacyTokenizer)}


def learn_tokenizer(cfg: DataConfig, pairs: Sequence[tuple[str, str]]) -> Tokenizer:
    """Learn the kind of tokenizer ``data.tokenizer`` names from the training pairs only."""
    try:
        return TOKENIZERS[cfg.tokenizer].learn(pairs, cfg)
    except ValueError as e:  # a vocabulary size or language the corpus cannot serve
        raise ConfigError(f"'data.tokenizer' ({cfg.tokenizer}): {e}") from e


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its ``state_dict``."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {kind!r} (known: {', '.join(sorted(TOKENIZERS))})")
    return TOKENIZERS[kind].from_state(state)
