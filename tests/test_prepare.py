"""The prepared corpus: ids equal to tokenizing in memory, reused until something changes,
never taken for finished when a prepare was cut short, and batches that cover it."""

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

import transformer.data.encode as encode
from transformer.config import ConfigError, load_config
from transformer.data.files import DataError, read_parallel
from transformer.data.prepare import ensure_prepared
from transformer.data.prepared import PreparedCorpus
from transformer.tasks.translation import TranslationTask, corpus_files

MULTI30K = ROOT / "data" / "multi30k"

# Lines that test the rules of reading and filtering: trailing blanks are stripped, a
# U+2028 stays inside its line, an empty side and an over-long side drop the pair.
ODD = [
    ("Ein Hund läuft.  \t", "A dog runs.\u00a0"),
    ("Zeile\u2028mit Trenner", "line\u2028with separator"),
    ("", "an empty source"),
    ("ein leeres Ziel", "   "),
    ("lang " * 150, "long " * 150),
]


def write_corpus(folder: Path, name: str, pairs: list[tuple[str, str]], gz: bool = False) -> list[str]:
    paths = []
    for side, lang in enumerate(("de", "en")):
        path = folder / (f"{name}.{lang}.gz" if gz else f"{name}.{lang}")
        data = "".join(pair[side] + "\n" for pair in pairs).encode("utf-8")
        path.write_bytes(gzip.compress(data) if gz else data)
        paths.append(str(path))
    return paths


def multi30k_pairs(split: str, n: int) -> list[tuple[str, str]]:
    if not (MULTI30K / "train.de.gz").exists():
        pytest.skip("Multi30k files absent from data/multi30k (CI links them from ../shared/data/multi30k)")
    stem = {"train": "train", "valid": "val"}[split]
    return read_parallel(MULTI30K / f"{stem}.de.gz", MULTI30K / f"{stem}.en.gz")[:n]


@pytest.fixture
def corpus(tmp_path):
    """A small corpus: 600 Multi30k training pairs with the odd lines among them (gzip),
    40 validation pairs (plain, with an empty line: never dropped)."""
    train = multi30k_pairs("train", 600)
    train[10:10] = ODD
    valid = multi30k_pairs("valid", 40) + [("", "")]
    return {"train": write_corpus(tmp_path, "train", train, gz=True), "valid": write_corpus(tmp_path, "valid", valid)}


def overrides(corpus, folder, *extra):
    return [f"data.train=[{corpus['train'][0]}, {corpus['train'][1]}]",
            f"data.valid=[{corpus['valid'][0]}, {corpus['valid'][1]}]",
            "data.vocab_size=500", "data.batch_tokens=600", f"data.prepared={folder}", *extra]


def prepare(corpus, folder, *extra, tokenizer=None):
    cfg = load_config(None, overrides(corpus, folder, *extra))
    return ensure_prepared(cfg.data, corpus_files(cfg.data), tokenizer)


def test_prepared_ids_equal_tokenizing_in_memory(corpus, tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="transformer.data.prepare"):
        prepared = prepare(corpus, tmp_path / "serial")
    tok = prepared.tokenizer
    train = read_parallel(*corpus["train"])
    expected = [(tok.encode_src(s), tok.encode_tgt(t)) for s, t in train]
    # Kept: neither side empty, none over data.max_len (100) tokens, specials aside.
    kept = [(s, t) for s, t in expected if len(s) > 1 and len(t) > 2 and len(s) - 1 <= 100 and len(t) - 2 <= 100]
    too_long = len(expected) - len(kept) - 2
    assert too_long >= 1 and len(prepared.train) == len(kept)
    assert [prepared.train.pair(i) for i in range(len(kept))] == kept
    assert f"2 with an empty side, {too_long} longer than 100 tokens" in caplog.text
    valid = read_parallel(*corpus["valid"])
    assert [prepared.valid.pair(i) for i in range(len(valid))] == [(tok.encode_src(s), tok.encode_tgt(t))
                                                                    for s, t in valid]
    assert prepared.train.ids["src"].dtype == np.uint16 and isinstance(prepared.train.ids["src"], np.memmap)
    # Through worker processes, in chunks of 50 pairs: the same files, byte for byte.
    monkeypatch.setattr(encode, "SERIAL_PAIRS", 100)
    monkeypatch.setattr(encode, "CHUNK", 50)
    parallel = prepare(corpus, tmp_path / "parallel", "data.prepare_workers=2", tokenizer=tok)
    for name in prepared.manifest["files"]:
        if name.endswith((".bin", ".idx")):
            assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes(), name
    assert parallel.manifest["splits"] == prepared.manifest["splits"]


def test_reused_until_an_input_or_a_setting_changes(corpus, tmp_path, caplog):
    folder = tmp_path / "prepared"
    prepare(corpus, folder)

    def rebuilt(*extra) -> str | None:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="transformer.data.prepare"):
            prepare(corpus, folder, *extra)
        preparing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preparing")]
        return preparing[0] if preparing else None

    assert rebuilt() is None
    assert rebuilt("data.batch_tokens=900", "data.min_freq=5") is None  # settings the ids do not depend on
    assert "'data.vocab_size' is 400" in rebuilt("data.vocab_size=400")
    assert "'data.vocab_size' is 500" in rebuilt()
    assert "'data.max_len' is 90" in rebuilt("data.max_len=90")
    assert rebuilt("data.max_len=90") is None
    Path(corpus["valid"][1]).write_text(Path(corpus["valid"][1]).read_text() + "one more\n")
    Path(corpus["valid"][0]).write_text(Path(corpus["valid"][0]).read_text() + "noch eine\n")
    assert "valid.de changed" in rebuilt("data.max_len=90")
    assert len(PreparedCorpus.open(folder).valid) == 42


def test_a_checkpoints_tokenizer_gets_a_corpus_of_its_own(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFORMER_PREPARED", str(tmp_path / "root"))
    base = overrides(corpus, "x")[:-1]  # the default folder, under TRANSFORMER_PREPARED
    cfg = load_config(None, base)
    files = corpus_files(cfg.data)
    learned = ensure_prepared(cfg.data, files)
    assert learned.folder.parent == tmp_path / "root" and ".de-en.sentencepiece." in learned.folder.name
    # The same tokenizer (a resumed run's): the same folder, not rebuilt.
    again = ensure_prepared(cfg.data, files, learned.tokenizer)
    assert again.folder == learned.folder and again.manifest["built"] == learned.manifest["built"]
    other = ensure_prepared(load_config(None, [*base, "data.vocab_size=400"]).data, files)
    assert other.folder == learned.folder  # rebuilt in place with the new setting
    # The first tokenizer again, now from a checkpoint: a folder of its own, ids by it.
    mine = ensure_prepared(cfg.data, files, learned.tokenizer)
    assert mine.folder != learned.folder and mine.folder.name.startswith(learned.folder.name + ".tok-")
    assert mine.manifest["tokenizer"]["sha256"] == learned.manifest["tokenizer"]["sha256"]
    assert PreparedCorpus.open(other.folder).tokenizer.src_vocab_size == 400


def test_an_interrupted_prepare_is_never_taken_for_finished(tmp_path):
    """A prepare killed (SIGKILL) while writing leaves no manifest, and the next run
    builds the corpus whole, removing what the killed one left."""
    pairs = multi30k_pairs("train", 29000)
    big = [(f"{s} {k}", f"{t} {k}") for k in range(4) for s, t in pairs]
    corpus = {"train": write_corpus(tmp_path, "train", big), "valid": write_corpus(tmp_path, "valid", pairs[:20])}
    folder = tmp_path / "prepared"
    settings = ["data.prepare_workers=1", "data.tokenizer_sample=5000"]
    args = [a for o in overrides(corpus, folder, *settings) for a in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "transformer.prepare", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            bins = list(tmp_path.glob(".prepared.tmp-*/train.src.bin"))
            if bins and bins[0].stat().st_size > 100_000:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("the prepare never started writing")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.stderr.close()
    assert not folder.exists()
    assert list(tmp_path.glob(".prepared.tmp-*"))  # what the killed prepare left
    with pytest.raises(DataError, match="not a prepared corpus"):
        PreparedCorpus.open(folder)
    prepared = prepare(corpus, folder, *settings)
    assert prepared.manifest["splits"]["train"]["lines"] == len(big)
    assert not list(tmp_path.glob(".prepared.tmp-*"))


def test_a_damaged_corpus_is_refused_and_rebuilt(corpus, tmp_path, caplog):
    folder = tmp_path / "prepared"
    whole = prepare(corpus, folder)
    expected = [whole.train.pair(i) for i in range(len(whole.train))]
    path = folder / "train.tgt.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="train.tgt.bin.*damaged"):
        PreparedCorpus.open(folder)
    with caplog.at_level(logging.INFO, logger="transformer.data.prepare"):
        again = prepare(corpus, folder)
    assert "damaged" in caplog.text
    assert [again.train.pair(i) for i in range(len(again.train))] == expected


def test_a_folder_that_is_not_a_prepared_corpus_is_left_alone(corpus, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"mine holds files but no prepared corpus's manifest.json"):
        prepare(corpus, folder)
    (folder / "manifest.json").write_text('{"name": "my own manifest"}')
    with pytest.raises(DataError, match=r"mine holds files but no prepared corpus's manifest.json"):
        prepare(corpus, folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json: not a prepared corpus's manifest \(line 1"):
        prepare(corpus, folder)
    assert (folder / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("serial", [True, False])
def test_bad_lines_name_the_file_and_line(tmp_path, monkeypatch, serial):
    if not serial:  # the error raised in a worker process reaches the caller whole
        monkeypatch.setattr(encode, "SERIAL_PAIRS", 0)
        monkeypatch.setattr(encode, "CHUNK", 2)
    src, tgt = tmp_path / "a.de", tmp_path / "a.en"
    src.write_bytes(b"eins\nzwei\ndrei\nvier\n")
    tgt.write_bytes(b"one\ntwo\nthr\xffee\nfour\n")
    corpus = {"train": [str(src), str(tgt)], "valid": [str(src), str(tgt)]}
    with pytest.raises(DataError, match=r"a\.en, line 3: not valid UTF-8"):
        prepare(corpus, tmp_path / "p", "data.tokenizer=spacy", "data.prepare_workers=2")
    tgt.write_bytes(b"one\ntwo\n")
    with pytest.raises(DataError, match=r"a\.de has 4 lines but .*a\.en has 2"):
        prepare(corpus, tmp_path / "p", "data.tokenizer=spacy")
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.tmp-*"))
    with pytest.raises(ConfigError, match="data.tokenizer_sample"):
        load_config(None, ["data.tokenizer_sample=-1"])


def test_the_tokenizer_learns_from_a_seeded_sample(tmp_path):
    pairs = [(f"satz {i}", f"sentence {i}") for i in range(1000)]
    src, tgt = write_corpus(tmp_path, "c", pairs)
    sample, n = encode.sample_pairs(Path(src), Path(tgt), 100)
    assert n == 1000 and len(sample) == 100 and len(set(sample)) == 100
    assert set(sample) <= set(pairs) and sample == sorted(sample, key=pairs.index)  # in corpus order
    assert encode.sample_pairs(Path(src), Path(tgt), 100)[0] == sample  # seeded
    assert encode.sample_pairs(Path(src), Path(tgt), 0)[0] == pairs  # 0: all
    assert encode.sample_pairs(Path(src), Path(tgt), 5000)[0] == pairs


def test_every_kept_pair_is_in_one_batch_per_epoch(corpus, tmp_path):
    cfg = load_config(None, overrides(corpus, tmp_path / "p"))
    task = TranslationTask(cfg)
    train = task.corpus.train
    expected = sorted((tuple(s), tuple(t)) for s, t in (train.pair(i) for i in range(len(train))))
    for epoch in (0, 1):
        batches = list(task.train_batches(epoch))
        seen = []
        for batch in batches:
            assert batch.src.numel() <= 600 and batch.tgt_in.numel() <= 600
            for src, tgt in zip(batch.src.tolist(), torch.cat([batch.tgt_in[:, :1], batch.tgt_out], 1).tolist()):
                seen.append((tuple(i for i in src if i != 0), tuple(i for i in tgt if i != 0)))
        assert sorted(seen) == expected
        # From batch k on (a resumed epoch): the same batches as the whole epoch's from k.
        rest = list(task.train_batches(epoch, 3))
        assert len(rest) == len(batches) - 3
        assert all(torch.equal(a.src, b.src) and torch.equal(a.tgt_out, b.tgt_out) for a, b in zip(rest, batches[3:]))
    assert [b.src.tolist() for b in task.train_batches(0)] != [b.src.tolist() for b in task.train_batches(1)]


@pytest.mark.parametrize("workers, sp_alpha", [(0, 0.0), (1, 0.0), (0, 0.5)])
def test_a_resumed_translation_run_equals_the_uninterrupted_one(corpus, tmp_path, monkeypatch, workers, sp_alpha):
    """Stopped inside its first epoch and resumed, a run on the prepared corpus ends
    with the same weights and validation losses (batches gathered here, or in a
    DataLoader worker; the prepared segmentation, or one sampled for the epoch)."""
    from transformer.training.checkpoint import load_checkpoint
    from transformer.training.run import resume_state, run_training
    from transformer.training.trainer import Trainer

    def config(run_dir):
        return load_config(None, overrides(corpus, tmp_path / "prepared", f"data.workers={workers}",
                                           f"data.sp_alpha={sp_alpha}", "model.N=1", "model.d_model=32", "model.d_ff=64",
                                           "model.h=4", "model.dropout=0.2", "decode.max_len_b=5", "train.max_steps=8",
                                           "train.eval_every=4", f"train.run_dir={run_dir}"))

    whole = run_training(config(tmp_path / "whole"))
    assert whole.epochs[0].step == 8 and not whole.epochs[0].complete  # all within the first epoch
    train_step = Trainer.train_step

    def stop_after_5(self, group):
        out = train_step(self, group)
        self.stopping.requested = self.state.step == 5
        return out

    monkeypatch.setattr(Trainer, "train_step", stop_after_5)
    run_training(config(tmp_path / "cut"))
    monkeypatch.setattr(Trainer, "train_step", train_step)
    state = resume_state(tmp_path / "cut")
    assert state["trainer"]["batch_in_epoch"] == 5
    run_training(load_config(None, [], base=state["config"]), resume=(tmp_path / "cut", state))
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert a["step"] == b["step"] == 8
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    valid = [line for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines() if '"valid"' in line]
    resumed = [line for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines() if '"valid"' in line]
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]  # noqa: E731
    assert strip(valid) == strip(resumed)


def test_the_encoding_workers_need_no_torch():
    """Workers started with "spawn" import the main module again (train.py, the prepare
    command, or a console script that imports transformer.cli): none of them loads torch."""
    code = ("import sys; sys.path.insert(0, '.'); import train, translate, transformer.cli, transformer.prepare, "
            "transformer.data.encode; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
