"""Subword regularisation (data.sp_alpha): each epoch's training pairs segmented anew."""

import collections
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_translation import slice_overrides, slices  # noqa: F401 (a fixture)

from transformer.config import ConfigError, load_config
from transformer.data.prepared import Split
from transformer.data.sampling import Lattices, Resegmenter, _Pieces
from transformer.data.words import WordBoundaries, WordTypes
from transformer.tasks.translation import TranslationTask


def pairs(batches):
    """Every (source, target) of an epoch's batches as id tuples, padding dropped, in order."""
    out = []
    for b in batches:
        for src, tgt in zip(b.src.tolist(), torch.cat([b.tgt_in[:, :1], b.tgt_out], 1).tolist()):
            out.append((tuple(i for i in src if i), tuple(i for i in tgt if i)))
    return out


@pytest.fixture(scope="module")
def task(slices):  # noqa: F811
    return TranslationTask(load_config(None, slice_overrides(slices, "data.sp_alpha=0.5")))


def digest(split):
    return hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in (*split.ids.values(), *split.offsets.values()))
                          ).hexdigest()


# Another process's digest of an epoch: argv is the config overrides, the seed, the epoch.
ANOTHER_PROCESS = textwrap.dedent("""
    import json, sys
    from test_sampling import digest
    from transformer.config import load_config
    from transformer.tasks.translation import TranslationTask
    overrides, seed, epoch = json.loads(sys.argv[1])
    print(digest(TranslationTask(load_config(None, overrides))._resegmenter.epoch(seed, epoch)))
""")


def test_an_epochs_segmentation_follows_from_the_seed_and_epoch_in_any_process(task, slices):  # noqa: F811
    overrides = slice_overrides(slices, "data.sp_alpha=0.5")
    again = TranslationTask(load_config(None, overrides), tokenizer=task.tokenizer)
    first = digest(task._resegmenter.epoch(1234, 2))
    assert digest(again._resegmenter.epoch(1234, 2)) == first
    assert digest(task._resegmenter.epoch(1234, 3)) != first and digest(task._resegmenter.epoch(4321, 2)) != first
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    other = subprocess.run([sys.executable, "-c", ANOTHER_PROCESS, json.dumps([overrides, 1234, 2])],
                           check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == first
    assert pairs(again.train_batches(2)) == pairs(task.train_batches(2))
    # An epoch taken from its batch `start` on (a resume) goes on as the whole epoch does.
    assert pairs(task.train_batches(2, start=3)) == pairs(list(task.train_batches(2))[3:])


def test_chunks_of_any_size_sample_the_same_segmentation(task):
    """A word's draws depend on the seed, the epoch and its place in the split alone: read
    in chunks of 7 sentences, the split samples as it does in one chunk."""
    whole = digest(task._resegmenter.epoch(1234, 1))
    chunked = Resegmenter(task.tokenizer, task.corpus.train, 0.5, task.cfg.max_len, chunk=7)
    assert len(task.corpus.train) > 7 * 10
    assert digest(chunked.epoch(1234, 1)) == whole
    lattices, words = chunked.lattices, chunked.words["src"][:500].astype(np.int64)
    key = np.uint64(99)
    count, pieces = lattices.sample(words, key)
    tail_count, tail_pieces = lattices.sample(words[200:], key, first=200)
    assert (tail_count == count[200:]).all() and (tail_pieces == pieces[count[:200].sum():]).all()


def plain_words(sp, sentence):
    """A sentence's words, the plain way: a word starts at a piece with "▁", at the
    sentence's start, and at and after a control piece."""
    words = []
    for k, i in enumerate(sentence):
        if not words or sp.id_to_piece(i).startswith("\u2581") or sp.is_control(i) or sp.is_control(sentence[k - 1]):
            words.append([])
        words[-1].append(i)
    return [tuple(w) for w in words]


@pytest.mark.parametrize("chunk", [7, 1 << 16])
def test_word_boundaries_split_each_sentence_as_the_plain_way_does(task, chunk):
    """On the training split, and on random sentences (any piece, controls among them,
    sentences starting without "▁", empty ones) where every rule decides some word."""
    sp, rng = task.tokenizer.sp, np.random.default_rng(0)
    train = task.corpus.train
    lengths = rng.integers(0, 12, size=300)
    pieces = rng.choice([*range(sp.get_piece_size())] + [sp.bos_id(), sp.eos_id()] * 400, size=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    random = Split("train", {"src": pieces, "tgt": train.ids["tgt"]}, {"src": offsets, "tgt": train.offsets["tgt"][:301]})
    boundaries = WordBoundaries(task.tokenizer)
    for split, side in ((train, "src"), (train, "tgt"), (random, "src")):
        got, chunks = [], 0
        for first, ids, at, bounds in boundaries.chunks(split, side, chunk):
            assert first == chunks * chunk
            chunks += 1
            ids, bounds = ids.tolist(), bounds.tolist()
            for a, b in itertools.pairwise(at.tolist()):  # the words inside each sentence
                inside = [w for w in bounds if a <= w < b] + [b]
                got.append([tuple(ids[u:v]) for u, v in itertools.pairwise(inside)])
        want = [plain_words(sp, split.ids[side][a:b].tolist()) for a, b in itertools.pairwise(split.offsets[side])]
        assert got == want
        assert chunks == -(-len(split) // chunk)
        assert any(len(words) > 3 for words in want) and any(sp.is_control(w[0]) for words in want for w in words)


@pytest.mark.parametrize("vocab_size", [8000, 1 << 20])
def test_word_types_number_every_word_as_a_dict_of_tuples_does(vocab_size):
    """Packed keys, the one-piece table and the long words' dict give each distinct word
    one number, kept across chunks (with 2**20 ids, words of over 3 pieces are long)."""
    rng = np.random.default_rng(0)
    types, reference, got, want = WordTypes(vocab_size), {}, [], []
    for _ in range(3):  # chunks
        lengths = rng.choice([1, 1, 1, 2, 3, 4, 5, 7], size=3000)
        ids = rng.integers(0, 6, size=int(lengths.sum())) * (vocab_size // 6) + rng.integers(0, 2, int(lengths.sum()))
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        got += types.number(ids, bounds).tolist()
        words = [tuple(ids[a:b].tolist()) for a, b in itertools.pairwise(bounds)]
        want += [reference.setdefault(w, len(reference)) for w in words]
        assert [types.words[n] for n in got[-len(words):]] == words
    assert len(types.words) == len(reference) > 1000
    # The same partition: equal words, equal numbers, and only those.
    pairs = set(zip(got, want))
    assert len(pairs) == len(set(got)) == len(set(want))


def word_lattice(tokenizer, word, alpha):
    """One word's lattice, the plain way: its edges (from, to, id) ordered by end node,
    then start node, and each edge's probability among those ending at its end node."""
    sp = tokenizer.sp
    normal = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))
              for i in range(sp.get_piece_size())]
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if normal[i]}
    if all(normal[i] for i in word):
        text = "".join(sp.id_to_piece(i) for i in word)
        spans = [(a, b, vocab[text[a:b]]) for b in range(1, len(text) + 1) for a in range(b) if text[a:b] in vocab]
    else:
        spans = [(k, k + 1, i) for k, i in enumerate(word)]
    reach = [0.0] + [-math.inf] * spans[-1][1]
    for a, b, i in spans:
        reach[b] = float(np.logaddexp(reach[b], reach[a] + alpha * sp.get_score(i)))
    edges = [(a, b, i) for a, b, i in spans if reach[a] > -math.inf]
    return edges, [math.exp(reach[a] + alpha * sp.get_score(i) - reach[b]) for a, b, i in edges]


def test_lattices_hold_every_segmentation_of_each_word_with_its_probability(task, monkeypatch):
    """The lattices built for all words at once (in blocks) hold each word's edges, in
    order, with the probabilities of the plain construction word by word: for a few real
    words, words joined from random pieces, and words with a control, unknown or byte
    piece (which keep their own segmentation). The first hash multiplier, 0, makes the
    pieces' hashes collide, so another is taken."""
    sp, rng = task.tokenizer.sp, np.random.default_rng(0)
    normal = [i for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    words = [tuple(sp.encode(w)) for w in ["Kinder", "spielen", "Fußballspieler", "wearing", "x"]]
    words += [tuple(rng.choice(normal, size=rng.integers(1, 6)).tolist()) for _ in range(300)]
    words += [(sp.bos_id(),), (5, sp.unk_id(), 7), (sp.piece_to_id("<0x41>"), normal[10]), (normal[3],)]
    assert sp.is_byte(sp.piece_to_id("<0x41>"))
    monkeypatch.setattr(_Pieces, "MULTIPLIERS", (0, *_Pieces.MULTIPLIERS))
    lattices = Lattices(task.tokenizer, words, 0.5, block=37)
    first, edges = lattices.first.astype(np.int64), len(lattices.edge_id)
    end_node = np.repeat(np.arange(len(first)), np.diff(np.append(first, edges)))
    # Each edge's probability: its node's cumulated sum less the one before it at that node.
    before = np.where(np.arange(edges) > first[end_node], np.append(0.0, lattices.within[:-1]), 0.0)
    probability = lattices.within - before
    for w, word in enumerate(words):
        want, probs = word_lattice(task.tokenizer, word, 0.5)
        start, end = lattices.start[w], lattices.end[w]
        assert end - start == want[-1][1], word
        at = slice(first[start], first[end + 1] if end + 1 < len(first) else edges)
        got = list(zip((lattices.edge_from[at] - start).tolist(), (end_node[at] - start).tolist(),
                       lattices.edge_id[at].tolist()))
        assert got == want, word
        np.testing.assert_allclose(probability[at], probs, rtol=1e-9, atol=1e-12, err_msg=str(word))


def test_a_substring_whose_hash_is_a_pieces_is_not_taken_for_it(monkeypatch):
    """With the multiplier 1 a hash is the sum of the characters, so "ba" hashes as the
    piece "ab" does: only a check of the characters keeps it out of the word's edges."""
    monkeypatch.setattr(_Pieces, "MULTIPLIERS", (1,))
    pieces = _Pieces(["\u2581", "a", "b", "ab"])
    word = np.array([0, 2, 1])  # "▁ba"
    froms, tos, ids = pieces.spans(word, np.array([3]), np.array([True]), np.array([10]))
    assert sorted(zip(froms.tolist(), tos.tolist(), ids.tolist())) == [(10, 11, 0), (11, 12, 2), (12, 13, 1)]
    word = np.array([0, 3])  # "▁ab"
    froms, tos, ids = pieces.spans(word, np.array([2]), np.array([True]), np.array([0]))
    assert sorted(zip(froms.tolist(), tos.tolist(), ids.tolist())) == [(0, 1, 0), (1, 2, 1), (1, 3, 3), (2, 3, 2)]


def exact(tokenizer, word, alpha):
    """Every segmentation of ``word`` (normalised text) into normal pieces, with its probability."""
    sp = tokenizer.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
             if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}

    def ways(text):
        if not text:
            yield ()
        for k in range(1, len(text) + 1):
            if text[:k] in vocab:
                yield from ((vocab[text[:k]], *rest) for rest in ways(text[k:]))

    weights = {seg: math.exp(alpha * sum(sp.get_score(i) for i in seg)) for seg in ways(word)}
    total = sum(weights.values())
    return {seg: w / total for seg, w in weights.items()}


def distance(counts, probs):
    """Total variation distance between draws (a Counter) and a distribution."""
    n = sum(counts.values())
    return sum(abs(counts[k] / n - probs.get(k, 0.0)) for k in set(counts) | set(probs)) / 2


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_a_words_segmentations_are_drawn_with_sentencepieces_probabilities(task, alpha):
    """Each segmentation is drawn with probability proportional to exp(alpha * its pieces'
    scores), as SentencePiece's own sampler draws them."""
    sp, n = task.tokenizer.sp, 20000
    for text in ["spielen", "Kinder", "wearing"]:
        best = tuple(sp.encode(text))
        probs = exact(task.tokenizer, "\u2581" + text, alpha)
        assert len(probs) >= 8 and max(probs.values()) < 0.95  # a word worth sampling
        count, pieces = Lattices(task.tokenizer, [best], alpha).sample(np.zeros(n, dtype=np.int64), np.uint64(7))
        ends = np.cumsum(count)
        ours = collections.Counter(tuple(pieces[e - c:e].tolist()) for c, e in zip(count, ends))
        theirs = collections.Counter(tuple(sp.encode(text, enable_sampling=True, alpha=alpha, nbest_size=-1))
                                     for _ in range(n))
        assert distance(theirs, probs) < 0.04, text  # the reference: SentencePiece agrees with `exact`
        assert distance(ours, probs) < 0.04, text


def test_the_sampled_pairs_spell_the_same_text(task):
    tok, best = task.tokenizer, task.corpus.train
    sampled = task._resegmenter.epoch(1234, 0)
    assert len(sampled) == len(best)
    changed = 0
    for i in range(len(best)):
        (src, tgt), (best_src, best_tgt) = sampled.pair(i), best.pair(i)
        assert src[-1] == tok.eos_id and tgt[0] == tok.bos_id and tgt[-1] == tok.eos_id
        assert tok.sp.decode(src) == tok.sp.decode(best_src) and tok.decode_tgt(tgt) == tok.decode_tgt(best_tgt)
        changed += (src, tgt) != (best_src, best_tgt)
    # alpha 0.5 re-segments about a third of the sentences of Multi30k.
    assert 0.1 * len(best) < changed < len(best)


def test_a_sampled_side_too_long_keeps_its_best_segmentation(task):
    best = task.corpus.train
    short = Resegmenter(task.tokenizer, best, alpha=0.1, max_len=8)
    sampled = short.epoch(1234, 0)
    kept = 0
    for i in range(len(best)):
        for side, (got, want) in enumerate(zip(sampled.pair(i), best.pair(i))):
            specials = 1 + side  # </s> on the source side, <s> and </s> on the target side
            assert len(got) - specials <= 8 or got == want
            kept += len(got) - specials > 8
    assert kept > 0


def test_sp_alpha_errors_name_the_key(slices):  # noqa: F811
    with pytest.raises(ConfigError, match="data.sp_alpha"):
        load_config(None, ["data.sp_alpha=-0.1"])
    # Refused before anything is prepared, whatever the order of the overrides.
    for other in (["data.tokenizer=spacy"], ["data.sp_model_type=bpe"]):
        with pytest.raises(ConfigError, match=f"data.sp_alpha.*{other[0].split('=')[1]}.*sp_alpha=0"):
            TranslationTask(load_config(None, slice_overrides(slices, *other, "data.sp_alpha=0.5")))
    TranslationTask(load_config(None, slice_overrides(slices, "data.sp_alpha=0.5", "data.tokenizer=spacy",
                                                      "data.sp_alpha=0", "model.tie_embeddings=false")))
