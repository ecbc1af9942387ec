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
from transformer.data.sampling import Lattices, Resegmenter, WordTypes
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
