"""Export to CTranslate2: the same translations from its engine as from ours.

Three small models are trained here, enough steps for their outputs to vary from
sentence to sentence: the copy task (post-norm, no end symbol), a Multi30k slice with
SentencePiece and tied embeddings (pre-norm), and one with spaCy word vocabularies.
Each is exported and decoded by both engines on every test sentence. The export is
shown to hang on each detail of the mapping: change one (CTranslate2's own positional
table, no √d_model, K and V swapped) and the outputs change.
"""

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli

ctranslate2 = pytest.importorskip(
    "ctranslate2", reason="ctranslate2 is not installed (the export extra: pip install -e \".[export]\")"
)

from transformer.config import load_config  # noqa: E402
from transformer.export import converter  # noqa: E402
from transformer.export.__main__ import main as export_main  # noqa: E402
from transformer.export.converter import ExportError, export_checkpoint, export_model  # noqa: E402
from transformer.inference.ctranslate2 import CTranslate2Translator, ExportedModelError  # noqa: E402
from transformer.inference.scoring import score  # noqa: E402
from transformer.inference.translator import Translator  # noqa: E402
from transformer.training.checkpoint import load_model  # noqa: E402
from transformer.training.run import run_training  # noqa: E402

MULTI30K = ROOT / "data" / "multi30k"
SMALL = ["model.d_model=64", "model.d_ff=128", "model.h=4", "train.amp=none", "train.max_minutes=null",
         "train.eval_every=10000", "train.lr_factor=1.0", "train.warmup=50"]


def _slice(folder: Path, split: str, n: int) -> list[str]:
    paths = []
    for lang in ("de", "en"):
        with gzip.open(MULTI30K / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[:n]
        path = folder / f"{split}.{lang}"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(str(path))
    return paths


def _train_translation(folder: Path, *extra: str) -> tuple[Path, list[str], list[str]]:
    if not (MULTI30K / "train.de.gz").exists():
        pytest.skip("Multi30k files absent from data/multi30k (CI links them from ../shared/data/multi30k)")
    train, valid = _slice(folder, "train", 1000), _slice(folder, "val", 20)
    test = _slice(folder, "test_2016_flickr", 100)
    cfg = load_config(ROOT / "configs" / "multi30k.yaml", [
        f"data.train=[{train[0]}, {train[1]}]", f"data.valid=[{valid[0]}, {valid[1]}]", "data.vocab_size=800",
        "data.batch_tokens=1200", f"data.prepared={folder / 'prepared'}", f"train.run_dir={folder / 'run'}",
        # The best segmentation: after 300 steps on 1,000 pairs with sampled ones, int8 and
        # fp32 agreed on 44 of 100 greedy outputs, too few to compare their BLEU.
        "model.dropout=0.1", "data.sp_alpha=0", *SMALL, *extra,
    ])
    run_training(cfg)
    read = lambda p: Path(p).read_text(encoding="utf-8").split("\n")[:100]  # noqa: E731
    return folder / "run" / "last.pt", read(test[0]), read(test[1])


@pytest.fixture(scope="module")
def translation(tmp_path_factory):
    """SentencePiece, tied embeddings, pre-norm, 2+2 layers: (checkpoint, test sources, references)."""
    return _train_translation(tmp_path_factory.mktemp("sentencepiece"), "model.N=2", "train.max_steps=300")


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """spaCy word vocabularies (one per language), untied: (checkpoint, test sources, references)."""
    return _train_translation(tmp_path_factory.mktemp("spacy"), "data.tokenizer=spacy", "data.min_freq=1",
                              "model.tie_embeddings=false", "model.N=1", "train.max_steps=150")


@pytest.fixture(scope="module")
def copy_task(tmp_path_factory):
    """The copy task, post-norm, no end symbol: (checkpoint, 200 random sequences of 1 to 12 symbols)."""
    folder = tmp_path_factory.mktemp("copy")
    cfg = load_config(ROOT / "configs" / "copy.yaml", [
        "model.N=1", "model.d_model=32", "model.d_ff=64", "model.norm=post", "data.copy.min_len=3",
        "train.max_steps=150", f"train.run_dir={folder / 'run'}",
    ])
    run_training(cfg)
    rng = random.Random(0)
    sources = ["1"] + [" ".join(str(rng.randint(1, 10)) for _ in range(rng.randint(1, 12))) for _ in range(199)]
    return folder / "run" / "last.pt", sources


def _exported(checkpoint: Path, quantization: str = "float32") -> Path:
    out = checkpoint.parent.parent / f"ct2-{quantization}"
    if not out.exists():
        export_checkpoint(checkpoint, out, quantization)
    return out


def _both(checkpoint: Path, **decoding) -> tuple[Translator, CTranslate2Translator]:
    ours = Translator.from_checkpoint(checkpoint, device="cpu", **decoding)
    theirs = CTranslate2Translator.from_directory(_exported(checkpoint), **decoding)
    return ours, theirs


def _log_probs_without_padding(translator: Translator, sources: list[list[int]], hyps) -> list[float]:
    """Each hypothesis's log-probability (its end symbol included where it ended), by
    our model, normalised over the vocabulary without padding."""
    model, tok, found = translator.model, translator.tokenizer, []
    with torch.no_grad():
        for src, h in zip(sources, hyps):
            if not src:
                found.append(float("nan"))
                continue
            gold = h.tokens + ([tok.eos_id] if h.length > len(h.tokens) else [])
            s, t = torch.tensor([src]), torch.tensor([[tok.bos_id] + gold[:-1]])
            out = model.decode(model.encode(s, (s != tok.pad_id).unsqueeze(1)), (s != tok.pad_id).unsqueeze(1), t,
                               torch.ones(1, t.size(1), t.size(1), dtype=torch.bool).tril())
            logits = model.logits(out)[0].double()
            logits[:, tok.pad_id] = -torch.inf
            found.append(float(logits.log_softmax(-1).gather(1, torch.tensor(gold).unsqueeze(1)).sum()))
    return found


@pytest.mark.parametrize("model", ["translation", "words", "copy_task"])
def test_greedy_outputs_and_scores_are_ours_on_every_sentence(model, request):
    checkpoint, sentences, *_ = request.getfixturevalue(model)
    ours, theirs = _both(checkpoint, beam_size=1)
    sources = ours.encode(sentences)
    assert theirs.encode(sentences) == sources
    a, b = ours.search(sources), theirs.search(sources)
    assert len({tuple(h[0].tokens) for h in a}) > len(sentences) // 2  # the outputs vary
    without_padding = _log_probs_without_padding(ours, sources, [h[0] for h in a])
    for i, (x, y) in enumerate(zip(a, b)):
        assert x[0].tokens == y[0].tokens, (i, sentences[i])
        assert x[0].length == y[0].length
        # Padding is suppressed in CTranslate2, so its probability is left out of the
        # normalisation: our log-probabilities up to that mass, ~1e-7 a token for a
        # trained model (and these translation models) but ~1e-2 for this copy model.
        assert y[0].log_prob == pytest.approx(without_padding[i], rel=1e-4, abs=1e-4), i
        if model != "copy_task":
            assert y[0].log_prob == pytest.approx(x[0].log_prob, rel=1e-4, abs=1e-4), i
    if model == "copy_task":  # no end symbol: every output runs to its limit, the source's length
        assert all(len(h[0].tokens) == len(s) for h, s in zip(b, sources))
    assert ours.translate(sentences) == theirs.translate(sentences)


@pytest.mark.parametrize("model", ["translation", "copy_task"])
def test_beam_search_is_ours_where_the_definitions_agree(model, request):
    """With α 0 and one hypothesis, CTranslate2 stops where our search does (its best
    candidate has ended): the same outputs, on every sentence."""
    checkpoint, sentences, *_ = request.getfixturevalue(model)
    ours, theirs = _both(checkpoint, beam_size=5, length_penalty=0.0)
    sources = ours.encode(sentences)
    a, b = ours.search(sources, nbest=1), theirs.search(sources, nbest=1)
    without_padding = _log_probs_without_padding(ours, sources, [h[0] for h in a])
    for i, (x, y) in enumerate(zip(a, b)):
        assert x[0].tokens == y[0].tokens, (i, sentences[i])
        assert y[0].score == pytest.approx(without_padding[i], rel=1e-4, abs=1e-4), i


def test_beam_search_with_the_gnmt_penalty_can_only_stop_earlier(translation):
    """With α 1, CTranslate2's finished hypotheses, re-ranked by GNMT's formula, are
    those our search had when it stopped: the output is ours, or one our search ranks
    below the one it found by searching on. Never better by our own measure."""
    checkpoint, sentences, _ = translation
    ours, theirs = _both(checkpoint, beam_size=5, length_penalty=1.0)
    sources = ours.encode(sentences)
    a = ours.search(sources, nbest=5)
    same = {}
    for patience in (1, 2):  # stopping after 5, or 10, finished hypotheses
        b = theirs.with_decoding(patience=patience).search(sources, nbest=5)
        same[patience] = 0
        for x, y in zip(a, b):
            assert [h.score for h in y] == sorted((h.score for h in y), reverse=True)  # ranked by our formula
            same[patience] += x[0].tokens == y[0].tokens
            assert x[0].score >= y[0].score - 1e-4 * abs(y[0].score)
    assert same[2] >= same[1] >= 0.9 * len(sources)


@pytest.mark.parametrize("patience, alpha", [(1, 1.0), (2, 1.0), (1, 0.0)])
def test_a_patient_beam_search_is_ctranslate2s(translation, patience, alpha):
    """``decode.patience`` stops our search by CTranslate2's rule: the same n-best lists,
    on every sentence, from both engines given the same patience, with a length penalty
    or without (at patience 1 and α 1, our full search's lists differ from CTranslate2's)."""
    checkpoint, sentences, _ = translation
    ours, theirs = _both(checkpoint, beam_size=5, length_penalty=alpha, patience=patience)
    assert theirs.patience == patience
    sources = ours.encode(sentences)
    a, b = ours.search(sources, nbest=5), theirs.search(sources, nbest=5)
    for i, (x, y) in enumerate(zip(a, b)):
        assert [h.tokens for h in x] == [h.tokens for h in y], (i, sentences[i])
        assert [h.score for h in x] == pytest.approx([h.score for h in y], rel=1e-3, abs=1e-3), i
    if (patience, alpha) == (1, 1.0):
        full = Translator.from_checkpoint(checkpoint, device="cpu", beam_size=5, length_penalty=alpha)
        assert full.cfg.patience is None
        differ = [[h.tokens for h in x] != [h.tokens for h in y] for x, y in zip(full.search(sources, nbest=5), b)]
        assert any(differ)


def test_int8_stays_within_one_bleu_of_fp32(translation):
    checkpoint, sentences, references = translation
    fp32 = CTranslate2Translator.from_directory(_exported(checkpoint), beam_size=1)
    int8 = CTranslate2Translator.from_directory(_exported(checkpoint, "int8"), beam_size=1)
    assert int8.compute_type.startswith("int8")
    a, b = fp32.translate(sentences), int8.translate(sentences)
    assert sum(x == y for x, y in zip(a, b)) >= 0.5 * len(sentences)
    assert abs(score(b, references).bleu - score(a, references).bleu) <= 1.0
    # Converting float32 weights when loading gives the same model as exporting in int8.
    loaded = CTranslate2Translator.from_directory(_exported(checkpoint), compute_type="int8", beam_size=1)
    assert loaded.translate(sentences) == b


def test_bf16_weights_are_stored_in_half_the_space(translation):
    checkpoint, sentences, _ = translation
    fp32, bf16 = _exported(checkpoint), _exported(checkpoint, "bf16")
    assert (bf16 / "model.bin").stat().st_size < 0.6 * (fp32 / "model.bin").stat().st_size
    assert json.loads((bf16 / "transformer.json").read_text())["quantization"] == "bf16"
    assert len(CTranslate2Translator.from_directory(bf16, beam_size=1).translate(sentences[:5])) == 5


MUTATIONS = {
    # CTranslate2's built-in table: [sin | cos], other frequencies, from position 1.
    "its own positional table": lambda spec: (
        setattr(spec.encoder.position_encodings, "encodings", "__optional"),
        setattr(spec.decoder.position_encodings, "encodings", "__optional"),
    ),
    "no embedding scale": lambda spec: (
        setattr(spec.encoder, "scale_embeddings", False), setattr(spec.decoder, "scale_embeddings", False),
    ),
    "K and V swapped in encoder-decoder attention": lambda spec: [
        _swap_halves(layer.attention.linear[1]) for layer in spec.decoder.layer
    ],
}


def _swap_halves(linear) -> None:
    import numpy as np

    half = linear.weight.shape[0] // 2
    linear.weight = np.concatenate([linear.weight[half:], linear.weight[:half]])
    linear.bias = np.concatenate([linear.bias[half:], linear.bias[:half]])


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_outputs_depend_on_each_detail_of_the_mapping(mutation, translation, tmp_path, monkeypatch):
    """The comparisons above can fail: one detail wrong, and greedy outputs differ."""
    checkpoint, sentences, _ = translation
    build_spec = converter.build_spec

    def broken(model, tokenizer):
        spec = build_spec(model, tokenizer)
        MUTATIONS[mutation](spec)
        return spec

    monkeypatch.setattr(converter, "build_spec", broken)
    export_checkpoint(checkpoint, tmp_path / "broken")
    ours = Translator.from_checkpoint(checkpoint, device="cpu", beam_size=1).translate(sentences)
    theirs = CTranslate2Translator.from_directory(tmp_path / "broken", beam_size=1).translate(sentences)
    assert sum(x != y for x, y in zip(ours, theirs)) >= 5


def test_a_model_ctranslate2_cannot_represent_is_refused(translation, tmp_path):
    checkpoint = translation[0]
    model, tokenizer, cfg = load_model(checkpoint)
    model.decoder.layers[0].sublayer[1].norm.eps = 1e-6  # CTranslate2 has one epsilon for the model
    model.tgt_embed[1].pe.mul_(2)
    with pytest.raises(ExportError) as error:
        export_model(model, tokenizer, cfg, tmp_path / "out")
    assert "different epsilons" in str(error.value) and "tgt_embed's positional table" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_bad_input_gives_a_clear_error(translation, tmp_path, capsys):
    checkpoint = translation[0]

    def fails(*argv: str) -> str:
        assert export_main([str(a) for a in argv]) == 2
        return capsys.readouterr().err

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    assert f"{text}: not a checkpoint" in fails(text, tmp_path / "a")
    assert "no such checkpoint file" in fails(tmp_path / "missing.pt", tmp_path / "a")
    assert "is a folder" in fails(tmp_path, tmp_path / "a")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert "not a checkpoint of this project" in fails(foreign, tmp_path / "a")
    # Weights of one shape under a config of another.
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["model"]["d_model"] = 32
    torch.save(state, tmp_path / "reshaped.pt")
    assert "does not describe a usable model" in fails(tmp_path / "reshaped.pt", tmp_path / "a")
    assert not (tmp_path / "a").exists()

    assert export_main([str(checkpoint), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert "already exists" in fails(checkpoint, tmp_path / "out")
    assert export_main([str(checkpoint), str(tmp_path / "out"), "--force", "--quantization", "int8"]) == 0
    assert json.loads((tmp_path / "out" / "transformer.json").read_text())["quantization"] == "int8"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    assert "not an exported model" in fails(checkpoint, tmp_path / "mine", "--force")
    assert (tmp_path / "mine" / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    with pytest.raises(ExportedModelError, match="not a model exported"):
        CTranslate2Translator.from_directory(tmp_path / "mine")


def test_the_folder_works_with_ctranslate2_alone_as_its_readme_says(translation):
    """SentencePiece pieces in, no </s> (the model appends it), pieces out: our greedy output."""
    import sentencepiece as spm

    checkpoint, sentences, _ = translation
    folder = _exported(checkpoint)
    assert {"model.bin", "config.json", "shared_vocabulary.json", "sentencepiece.model", "transformer.json",
            "README.md"} <= {p.name for p in folder.iterdir()}
    assert "add_source_eos" in (folder / "README.md").read_text()
    config = json.loads((folder / "config.json").read_text())
    assert config["add_source_eos"] and config["decoder_start_token"] == "<s>" and config["layer_norm_epsilon"] == 1e-5
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sentencepiece.model"))
    engine = ctranslate2.Translator(str(folder))
    ours = Translator.from_checkpoint(checkpoint, device="cpu", beam_size=1, max_len_a=0, max_len_b=40)
    found = engine.translate_batch([sp.encode(s, out_type=str) for s in sentences[:20]], beam_size=1,
                                   max_decoding_length=40, min_decoding_length=0, suppress_sequences=[["<pad>"]])
    assert [sp.decode(r.hypotheses[0]) for r in found] == ours.translate(sentences[:20])


def test_the_translator_interface(translation):
    checkpoint, sentences, _ = translation
    ours, theirs = _both(checkpoint, beam_size=3, length_penalty=0.0)
    lines = [sentences[0], "", "   ", sentences[1]]
    assert theirs.translate(lines) == ours.translate(lines)
    assert theirs.translate(lines)[1:3] == ["", ""]
    nbest = theirs.translate_nbest(lines, nbest=2)
    assert [len(n) for n in nbest] == [2, 1, 1, 2] and nbest[0][0][1] >= nbest[0][1][1]
    greedy = theirs.with_decoding(beam_size=1)
    assert greedy.translator is theirs.translator and greedy.cfg.beam_size == 1 and theirs.cfg.beam_size == 3
    assert greedy.translate(lines) == Translator.from_checkpoint(checkpoint, device="cpu", beam_size=1).translate(lines)
    assert theirs.config.model.N == 2 and theirs.model is None
    for patience in (0, -1.0):  # a config refuses them on loading; here they come as arguments
        with pytest.raises(ValueError, match="patience must be positive"):
            theirs.with_decoding(patience=patience)


def test_translate_py_switches_engine_with_one_flag(translation, tmp_path):
    checkpoint, sentences, _ = translation
    source = tmp_path / "test.de"
    source.write_text("\n".join(sentences[:30]) + "\n", encoding="utf-8")
    common = ["--input", str(source), "--beam-size", "5", "--length-penalty", "0"]
    ours = run_cli("translate.py", "--checkpoint", str(checkpoint), *common)
    on_the_fly = run_cli("translate.py", "--checkpoint", str(checkpoint), "--engine", "ctranslate2", *common)
    exported = run_cli("translate.py", "--model", str(_exported(checkpoint)), *common, "--nbest", "2")
    for result in (ours, on_the_fly, exported):
        assert result.returncode == 0, result.stderr
    assert on_the_fly.stdout == ours.stdout and len(ours.stdout.splitlines()) == 30
    rows = [line.split("\t") for line in exported.stdout.splitlines()]
    assert len(rows) == 60 and all(len(r) == 4 for r in rows)
    assert [r[3] for r in rows if r[1] == "1"] == ours.stdout.splitlines()
    refused = run_cli("translate.py", "--checkpoint", str(checkpoint), "--dtype", "int8", "x")
    assert refused.returncode == 2 and "--dtype int8 needs --engine ctranslate2" in refused.stderr
