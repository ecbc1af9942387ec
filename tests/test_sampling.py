"""Subword regularisation (data.sp_alpha): each epoch's training pairs segmented anew."""

import logging

import pytest
import torch
from test_translation import slice_overrides, slices  # noqa: F401 (a fixture)

from transformer.config import ConfigError, load_config
from transformer.data.sampling import Resegmenter
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


def test_in_one_process_an_epochs_segmentation_follows_from_the_seed_and_epoch(task, slices):  # noqa: F811
    def segment(t, seed, epoch):
        split = t._resegmenter.epoch(seed, epoch)
        return [split.pair(i) for i in range(len(split))]

    again = TranslationTask(load_config(None, slice_overrides(slices, "data.sp_alpha=0.5")), tokenizer=task.tokenizer)
    # Sampling elsewhere in the process in between changes nothing.
    task.tokenizer.sp.encode("Ein Hund läuft über die Wiese.", enable_sampling=True, alpha=0.1, nbest_size=-1)
    first = segment(task, 1234, 2)
    assert segment(again, 1234, 2) == first
    assert segment(task, 1234, 3) != first and segment(task, 4321, 2) != first
    assert pairs(again.train_batches(2)) == pairs(task.train_batches(2))
    # An epoch taken from its batch `start` on goes on as the whole epoch does (within
    # one process; another process samples another segmentation: sampling.py).
    assert pairs(task.train_batches(2, start=3)) == pairs(list(task.train_batches(2))[3:])


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


def test_sp_alpha_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.sp_alpha"):
        load_config(None, ["data.sp_alpha=-0.1"])
    with pytest.raises(ConfigError, match="data.sp_alpha.*spacy"):
        load_config(None, ["data.sp_alpha=0.5", "data.tokenizer=spacy"])
    with pytest.raises(ConfigError, match="data.sp_alpha.*copy"):
        load_config(None, ["data.sp_alpha=0.5", "data.task=copy"])


def test_several_processes_are_refused(slices, monkeypatch):  # noqa: F811
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="data.sp_alpha.*one process"):
        TranslationTask(load_config(None, slice_overrides(slices, "data.sp_alpha=0.5")))


def test_a_resume_says_its_segmentations_differ(task, slices, caplog):  # noqa: F811
    cfg = load_config(None, slice_overrides(slices, "data.sp_alpha=0.5"))
    fresh, resumed = TranslationTask(cfg, tokenizer=task.tokenizer), TranslationTask(cfg, tokenizer=task.tokenizer)
    warnings = lambda: [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    with caplog.at_level(logging.WARNING):
        fresh.train_batches(0)  # a run's start
        assert warnings() == []
        resumed.train_batches(2)  # a resume at an epoch's start
        resumed.train_batches(3)
    assert len(warnings()) == 1 and "resuming at epoch 3, batch 0" in warnings()[0]
