"""Tokenizers and vocabularies: determinism, special ids, round trips through checkpoints."""

import random

import pytest
import torch

from transformer.data.tokenizers import (
    IdTokenizer,
    SentencePieceTokenizer,
    SpacyTokenizer,
    detokenize,
    spacy_words,
    tokenizer_from_state,
)
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, Vocab

DE = {
    "det": ["Ein", "Der", "Die", "Das", "Eine"],
    "noun": ["Hund", "Mann", "Frau", "Kind", "Junge", "Mädchen", "Ball", "Straße", "Fahrrad", "Gruppe"],
    "verb": ["läuft", "spielt", "sitzt", "springt", "fährt", "steht", "wartet", "schaut"],
    "place": ["im Park", "auf der Straße", "am Strand", "vor dem Haus", "über die Wiese", "im Schnee"],
}
EN = {
    "det": ["A", "The", "One", "This"],
    "noun": ["dog", "man", "woman", "child", "boy", "girl", "ball", "street", "bike", "group"],
    "verb": ["runs", "plays", "sits", "jumps", "rides", "stands", "waits", "looks"],
    "place": ["in the park", "on the street", "at the beach", "outside the house", "across the grass"],
}


def sentence(rng: random.Random, lex: dict[str, list[str]]) -> str:
    words = [rng.choice(lex["det"]), rng.choice(lex["noun"]), rng.choice(lex["verb"]), rng.choice(lex["place"])]
    if rng.random() < 0.3:
        words[1] += ","
        words.insert(2, rng.choice(["ruhig", "schnell", "happily", "quickly"]))
    return " ".join(words) + rng.choice([".", ".", "!", "?"])


def corpus(n: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(sentence(rng, DE), sentence(rng, EN)) for _ in range(n)]


PAIRS = corpus()
TEXT = [s for s, _ in PAIRS] + [t for _, t in PAIRS]
SP_VOCAB = 360  # byte fallback alone takes 4 specials + 256 bytes; the corpus's characters ~50 more


@pytest.fixture(scope="module")
def sp() -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train(TEXT, vocab_size=SP_VOCAB)


@pytest.fixture(scope="module")
def spacy_tok() -> SpacyTokenizer:
    return SpacyTokenizer.build(PAIRS)


def torch_round_trip(state, tmp_path):
    """Save through torch.save and read back as a checkpoint is read."""
    path = tmp_path / "tok.pt"
    torch.save({"tokenizer": state}, path)
    return torch.load(path, weights_only=True)["tokenizer"]


# Vocab


def test_vocab_build_orders_by_frequency_then_alphabet_after_fixed_specials():
    vocab = Vocab.build([["b", "a", "c", "a"], ["b", "c", "d", "a"], ["e", "<unk>", "<unk>"]], min_freq=2)
    assert vocab.itos == SPECIALS + ["a", "b", "c"]  # a: 3; b, c: 2 (alphabetical); d, e: 1 (dropped)
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert len(vocab) == 7
    assert vocab.encode(["a", "c", "d", "<unk>"]) == [4, 6, UNK_ID, UNK_ID]
    assert vocab.decode([4, 5, UNK_ID]) == ["a", "b", "<unk>"]


def test_vocab_min_freq_and_max_size():
    lists = [["x"] * 5 + ["y"] * 3 + ["z"]]
    assert Vocab.build(lists, min_freq=1).itos[4:] == ["x", "y", "z"]
    assert Vocab.build(lists, min_freq=4).itos[4:] == ["x"]
    assert Vocab.build(lists, min_freq=1, max_size=5).itos == SPECIALS + ["x"]
    with pytest.raises(ValueError):
        Vocab.build(lists, max_size=3)


def test_vocab_is_deterministic_and_round_trips_its_state():
    words = [s.split() for s in TEXT]
    a, b = Vocab.build(words), Vocab.build(list(reversed(words)))
    assert a == b
    state = a.state_dict()
    assert type(state) is list and all(type(t) is str for t in state)
    again = Vocab.from_state(state)
    assert again == a and again.encode(words[0]) == a.encode(words[0])


def test_vocab_rejects_bad_states_and_ids():
    with pytest.raises(ValueError):
        Vocab.from_state(["a", "b"])
    with pytest.raises(ValueError):
        Vocab.from_state(SPECIALS + ["a", "a"])
    with pytest.raises(ValueError):
        Vocab.build([["a", "a"]]).decode([-1])


# IdTokenizer and the registry


def test_id_tokenizer_encode_tgt_prepends_the_start_symbol():
    tok = IdTokenizer(11)
    assert tok.encode_src("3 4 5") == [3, 4, 5]
    assert tok.encode_tgt("3 4 5") == [1, 3, 4, 5]


def test_unknown_kind_is_a_value_error():
    with pytest.raises(ValueError, match="nope"):
        tokenizer_from_state({"kind": "nope"})


# SentencePiece


def test_sentencepiece_training_is_deterministic(sp):
    again = SentencePieceTokenizer.train(TEXT, vocab_size=SP_VOCAB)
    assert again.model == sp.model
    assert [again.encode_src(s) for s in TEXT[:20]] == [sp.encode_src(s) for s in TEXT[:20]]


def test_sentencepiece_sizes_and_specials(sp):
    assert sp.kind == "sentencepiece" and sp.shared_vocab
    assert sp.src_vocab_size == sp.tgt_vocab_size == SP_VOCAB
    assert (sp.pad_id, sp.bos_id, sp.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert [sp.sp.id_to_piece(i) for i in range(4)] == SPECIALS


def test_sentencepiece_encodes_with_specials_and_round_trips_text(sp):
    for text in TEXT[:50] + ["Ein Hund läuft im Park.", "A dog runs, quickly!"]:
        src, tgt = sp.encode_src(text), sp.encode_tgt(text)
        assert src[-1] == EOS_ID and EOS_ID not in src[:-1] and BOS_ID not in src
        assert tgt[0] == BOS_ID and tgt[-1] == EOS_ID and tgt[1:] == src
        assert sp.decode_tgt(tgt[1:-1]) == text


def test_sentencepiece_unknown_characters_fall_back_to_bytes(sp):
    text = "Ein Hund 😀 sieht 漢字."
    ids = sp.encode_src(text)
    assert all(0 <= i < sp.src_vocab_size for i in ids) and UNK_ID not in ids
    assert sp.decode_tgt(ids[:-1]) == text


def test_sentencepiece_state_round_trips_through_a_checkpoint(sp, tmp_path):
    state = sp.state_dict()
    assert state["kind"] == "sentencepiece" and isinstance(state["model"], bytes)
    for again in (tokenizer_from_state(state), tokenizer_from_state(torch_round_trip(state, tmp_path))):
        assert isinstance(again, SentencePieceTokenizer)
        assert [again.encode_tgt(t) for t in TEXT] == [sp.encode_tgt(t) for t in TEXT]


def test_sentencepiece_vocab_too_large_is_a_helpful_value_error():
    with pytest.raises(ValueError, match=r"too large.*data\.vocab_size"):
        SentencePieceTokenizer.train(TEXT[:50], vocab_size=20000)
    with pytest.raises(ValueError, match=r"too small.*data\.vocab_size"):
        SentencePieceTokenizer.train(TEXT[:50], vocab_size=100)


# spaCy


def test_spacy_splits_punctuation_and_drops_whitespace():
    assert spacy_words("Ein Hund läuft.", "de") == ["Ein", "Hund", "läuft", "."]
    assert spacy_words("  Zwei  Hunde,  (im Park)! ", "de") == ["Zwei", "Hunde", ",", "(", "im", "Park", ")", "!"]


def test_spacy_vocabularies_are_separate_and_from_the_given_pairs_only(spacy_tok):
    tok = SpacyTokenizer.build([("Hund Hund Katze", "dog dog cat"), ("Hund läuft", "dog runs")], min_freq=2)
    assert tok.kind == "spacy" and not tok.shared_vocab
    assert tok.src_vocab.itos == SPECIALS + ["Hund"] and tok.tgt_vocab.itos == SPECIALS + ["dog"]
    assert (tok.src_vocab_size, tok.tgt_vocab_size) == (5, 5)
    assert tok.encode_src("Hund Katze") == [4, UNK_ID, EOS_ID]  # Katze: seen once
    assert tok.encode_tgt("dog cat") == [BOS_ID, 4, UNK_ID, EOS_ID]
    # On the corpus: German words are not in the English vocabulary and vice versa.
    assert "Hund" in spacy_tok.src_vocab.stoi and "Hund" not in spacy_tok.tgt_vocab.stoi
    assert "dog" in spacy_tok.tgt_vocab.stoi and "dog" not in spacy_tok.src_vocab.stoi


def test_spacy_decodes_with_the_detokenizer(spacy_tok):
    assert detokenize(["A", "dog", "runs", "."]) == "A dog runs."
    assert detokenize(["A", "man", "(", "old", ")", ",", "he", "is", "n't", "the", "man", "'s", "dog", "!"]) == (
        "A man (old), he isn't the man's dog!"
    )
    for text in [t for _, t in PAIRS[:50]]:
        assert spacy_tok.decode_tgt(spacy_tok.encode_tgt(text)[1:-1]) == text
    assert spacy_tok.decode_tgt(spacy_tok.encode_tgt("A zebra runs.")[1:-1]) == "A <unk> runs."


def test_spacy_state_round_trips_through_a_checkpoint(spacy_tok, tmp_path):
    state = spacy_tok.state_dict()
    assert set(state) == {"kind", "src_lang", "tgt_lang", "src_vocab", "tgt_vocab", "min_freq"}
    again = tokenizer_from_state(torch_round_trip(state, tmp_path))
    assert isinstance(again, SpacyTokenizer)
    assert again.src_vocab == spacy_tok.src_vocab and again.tgt_vocab == spacy_tok.tgt_vocab
    assert [again.encode_src(s) for s, _ in PAIRS] == [spacy_tok.encode_src(s) for s, _ in PAIRS]
    assert [again.encode_tgt(t) for _, t in PAIRS] == [spacy_tok.encode_tgt(t) for _, t in PAIRS]
