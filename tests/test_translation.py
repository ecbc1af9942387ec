"""The translation pipeline on small slices of Multi30k: data, tokenizers, training, scoring."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli

from transformer.config import ConfigError, load_config
from transformer.data.files import DataError
from transformer.inference.translator import Translator
from transformer.tasks.translation import TranslationTask
from transformer.training.run import run_training

MULTI30K = ROOT / "data" / "multi30k"
needs_multi30k = pytest.mark.skipif(
    not (MULTI30K / "train.de.gz").exists(),
    reason="Multi30k files absent from data/multi30k (CI links them from ../shared/data/multi30k)",
)
TINY = ["model.N=1", "model.d_model=32", "model.d_ff=64", "model.h=4", "decode.max_len_b=5"]


def write_slice(folder: Path, split: str, n: int, skip: int = 0) -> list[str]:
    """The first n pairs (after skip) of a Multi30k split as plain files; returns [de, en]."""
    paths = []
    for lang in ("de", "en"):
        with gzip.open(MULTI30K / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[skip : skip + n]
        path = folder / f"{split}.{lang}"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    if not (MULTI30K / "train.de.gz").exists():
        pytest.skip("Multi30k files absent from data/multi30k (CI links them from ../shared/data/multi30k)")
    folder = tmp_path_factory.mktemp("slices")
    return {
        "train": write_slice(folder, "train", 600),
        "valid": write_slice(folder, "val", 40),
        "test": write_slice(folder, "test_2016_flickr", 30),
    }


def slice_overrides(slices, *extra):
    return [
        f"data.train=[{slices['train'][0]}, {slices['train'][1]}]",
        f"data.valid=[{slices['valid'][0]}, {slices['valid'][1]}]",
        f"data.test=[{slices['test'][0]}, {slices['test'][1]}]",
        "data.vocab_size=500",
        "data.batch_tokens=600",
        *TINY,
        *extra,
    ]


def test_training_a_few_steps_on_a_slice(slices, tmp_path):
    """train → validate (loss, BLEU) → best/last → test scores → translate, all on real text."""
    cfg = load_config(ROOT / "configs" / "multi30k.yaml",
                      slice_overrides(slices, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=4",
                                      "train.eval_every=2", "train.amp=bf16"))
    result = run_training(cfg)
    run_dir = result.run_dir
    for name in ("config.yaml", "tokenizer.pt", "last.pt", "best.pt", "metrics.jsonl", "test.hyp.txt"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [2, 4]
    assert all(r["valid_loss"] > 0 and 0 <= r["bleu"] <= 100 for r in valid)
    test = [r for r in records if r["kind"] == "test"]
    assert len(test) == 1 and "tok:13a" in test[0]["signature"]
    assert len((run_dir / "test.hyp.txt").read_text(encoding="utf-8").split("\n")) == 31
    translator = Translator.from_checkpoint(run_dir / "best.pt", device="cpu")
    assert len(translator.translate(["Ein Hund läuft über die Wiese. 😀", ""])) == 2


def test_the_length_penalty_is_chosen_on_validation_and_kept_in_best_pt(slices, tmp_path):
    """train.tune_length_penalty: the validation BLEU of each alpha is recorded, the best
    (the first of equals) goes into best.pt and decodes the test set; last.pt keeps its own."""
    from transformer.inference.scoring import score
    from transformer.training.callbacks import MetricsLog

    cfg = load_config(ROOT / "configs" / "multi30k.yaml",
                      slice_overrides(slices, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=4",
                                      "train.tune_length_penalty=[2.0, 0.0]", "decode.beam_size=3"))
    run_dir = run_training(cfg).run_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    [tuned] = [r for r in records if r["kind"] == "length_penalty"]
    bleu = {alpha: b for alpha, b in tuned["valid_bleu"]}
    assert list(bleu) == [2.0, 0.0] and tuned["chosen"] == max(bleu, key=bleu.get)
    src, ref = (Path(p).read_text(encoding="utf-8").splitlines() for p in slices["valid"])
    for alpha, recorded in bleu.items():
        translator = Translator.from_checkpoint(run_dir / "best.pt", device="cpu", length_penalty=alpha)
        assert score(translator.translate(src), ref).bleu == pytest.approx(recorded)
    assert Translator.from_checkpoint(run_dir / "best.pt", device="cpu").cfg.length_penalty == tuned["chosen"]
    assert Translator.from_checkpoint(run_dir / "last.pt", device="cpu").cfg.length_penalty == 1.0
    [test] = [r for r in records if r["kind"] == "test"]
    assert test["decoding"] == f"beam 3, alpha {tuned['chosen']:g}"

    # The choice itself, where the scores differ: the alpha under which the outputs are
    # the references wins, wherever it stands in the list.
    class Echo:
        cfg = Translator.from_checkpoint(run_dir / "best.pt", device="cpu").cfg

        def translate(self, sentences):
            return ref if self.cfg.length_penalty == 0.6 else ["a"] * len(sentences)

    task = TranslationTask(cfg)
    task.length_penalties = (1.5, 0.6, 1.0)
    echo = Echo()
    task._tune_length_penalty(echo, run_dir / "best.pt", MetricsLog(tmp_path / "metrics.jsonl"))
    assert echo.cfg.length_penalty == 0.6
    assert Translator.from_checkpoint(run_dir / "best.pt", device="cpu").cfg.length_penalty == 0.6


def test_translate_cli_scores_against_a_reference(slices, tmp_path):
    cfg = load_config(ROOT / "configs" / "multi30k.yaml",
                      slice_overrides(slices, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=2"))
    run_dir = run_training(cfg).run_dir
    src, ref = slices["test"]
    out = tmp_path / "hyp.txt"
    result = run_cli("translate.py", "--checkpoint", str(run_dir / "last.pt"), "--input", src,
                     "--reference", ref, "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "BLEU" in result.stderr and "nrefs:1|case:mixed|eff:no|tok:13a" in result.stderr and "chrF" in result.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == 30
    short_ref = tmp_path / "short.en"
    short_ref.write_text("one line\n", encoding="utf-8")
    result = run_cli("translate.py", "--checkpoint", str(run_dir / "last.pt"), "--input", src,
                     "--reference", str(short_ref))
    assert result.returncode == 2 and "short.en" in result.stderr


def test_spacy_word_vocabularies_from_the_training_split(slices, tmp_path):
    cfg = load_config(ROOT / "configs" / "multi30k.yaml",
                      slice_overrides(slices, "data.tokenizer=spacy", "data.sp_alpha=0", "model.tie_embeddings=false"))
    task = TranslationTask(cfg)
    tok = task.tokenizer
    assert not tok.shared_vocab and tok.src_vocab_size != tok.tgt_vocab_size
    # Built from the 600 training pairs only, keeping words seen at least twice.
    from collections import Counter

    from transformer.data.tokenizers import spacy_words

    counts = Counter(w for line in Path(slices["train"][0]).read_text(encoding="utf-8").splitlines()
                     for w in spacy_words(line, "de"))
    once = next(w for w, n in counts.items() if n == 1)
    twice = next(w for w, n in counts.items() if n >= 2)
    unk = 3
    assert tok.encode_src(once)[0] == unk and tok.encode_src(twice)[0] != unk
    assert tok.encode_src("Flugzeugträgerdeck")[0] == unk
    with pytest.raises(ConfigError, match="model.tie_embeddings"):
        run_training(load_config(ROOT / "configs" / "multi30k.yaml",
                                 slice_overrides(slices, "data.tokenizer=spacy", "data.sp_alpha=0",
                                                 f"train.run_dir={tmp_path / 'run'}")))


def test_batches_with_workers_equal_batches_without(slices):
    base = slice_overrides(slices)
    a = TranslationTask(load_config(None, base + ["data.workers=0"]))
    b = TranslationTask(load_config(None, base + ["data.workers=1"]), tokenizer=a.tokenizer)
    left, right = list(a.train_batches(3)), list(b.train_batches(3))
    assert len(left) == len(right) > 1
    assert all(torch.equal(x.src, y.src) and torch.equal(x.tgt_out, y.tgt_out) for x, y in zip(left, right))
    # Every training pair appears once per epoch.
    assert sum(x.src.size(0) for x in left) == len(a.corpus.train)


def test_bad_corpus_errors_name_the_file(tmp_path):
    src, tgt = tmp_path / "a.de", tmp_path / "a.en"
    src.write_text("eins\nzwei\ndrei\n", encoding="utf-8")
    tgt.write_text("one\ntwo\n", encoding="utf-8")
    result = run_cli("train.py", "--set", f"data.train=[{src}, {tgt}]", "--set", f"data.valid=[{src}, {tgt}]",
                     "--set", f"train.run_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    assert "a.de" in result.stderr and "a.en" in result.stderr and "3" in result.stderr and "2" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_corpus_offline_lists_the_files(tmp_path):
    cfg = load_config(None, [f"data.dir={tmp_path / 'empty'}", "data.download=false"])
    with pytest.raises(DataError) as e:
        TranslationTask(cfg)
    message = str(e.value)
    assert "train.de.gz" in message and "test_2016_flickr.en.gz" in message and "TRANSFORMER_DATA" in message


def test_fine_tuning_lowers_the_validation_loss_on_new_data(slices, tmp_path):
    """A model trained on one slice, fine-tuned on other sentences: the new validation
    loss falls from where the checkpoint started (step 0 of the fine-tuning run); frozen
    parts stay as they were; the tokenizer is the checkpoint's."""
    base = run_training(load_config(ROOT / "configs" / "multi30k.yaml",
                                    slice_overrides(slices, f"train.run_dir={tmp_path / 'base'}", "train.max_steps=6",
                                                    "data.test=null"))).run_dir
    folder = tmp_path / "new"
    folder.mkdir()
    train, valid = write_slice(folder, "train", 300, skip=5000), write_slice(folder, "val", 40, skip=500)
    from transformer.training.run import finetune_config

    cfg, _ = finetune_config(ROOT / "configs" / "finetune.yaml", [
        f"data.train=[{train[0]}, {train[1]}]", f"data.valid=[{valid[0]}, {valid[1]}]", "data.batch_tokens=600",
        "train.max_steps=8", "train.eval_every=4", "train.lr_factor=1", "train.warmup=8", "train.amp=none",
        "finetune.freeze_encoder=true", "decode.max_len_b=5", "decode.beam_size=2", f"train.run_dir={tmp_path / 'ft'}",
    ], base / "last.pt")
    run_dir = run_training(cfg).run_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["valid_loss"] for r in records if r["kind"] == "valid"}
    assert sorted(losses) == [0, 4, 8]
    assert losses[8] < losses[0]
    before, after = torch.load(base / "last.pt", weights_only=True), torch.load(run_dir / "last.pt", weights_only=True)
    assert after["tokenizer"] == before["tokenizer"]
    for name, value in after["model"].items():
        same = torch.equal(value, before["model"][name])
        assert same == name.startswith("encoder."), name


def test_fine_tuning_config_may_not_reshape_the_model(tmp_path):
    from transformer.config import Config, ModelConfig, to_dict
    from transformer.data.tokenizers import IdTokenizer
    from transformer.training.checkpoint import build_model, save_checkpoint
    from transformer.training.run import finetune_config

    cfg = Config(model=ModelConfig(N=1, d_model=32, d_ff=64, h=4))
    model = build_model(cfg.model, IdTokenizer(11))
    ckpt = tmp_path / "small.pt"
    save_checkpoint(ckpt, {"config": to_dict(cfg), "model": model.state_dict(), "tokenizer": IdTokenizer(11).state_dict()})
    inherited, _ = finetune_config(ROOT / "configs" / "finetune.yaml", ["model.dropout=0.3"], ckpt)
    assert (inherited.model.d_model, inherited.model.N, inherited.model.dropout) == (32, 1, 0.3)
    with pytest.raises(ConfigError, match=r"'model\.d_model' is 64 here but 32 in .*small\.pt"):
        finetune_config(ROOT / "configs" / "finetune.yaml", ["model.d_model=64"], ckpt)
