"""The figure command, and the claims of docs/guide.md that no other test file checks."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from torch import nn

from transformer.config import Config, DecodeConfig, ModelConfig, to_dict
from transformer.data.batching import padding_mask
from transformer.data.tokenizers import IdTokenizer
from transformer.figures.article import dot_products, plot_training_curve, read_metrics, smoothing_penalty
from transformer.figures.attention import checkpoint_input
from transformer.figures.command import FIGURES, main
from transformer.figures.drawing import FigureError
from transformer.inference.translator import Translator
from transformer.model import SublayerConnection, make_model
from transformer.training.checkpoint import build_model, save_checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    """A non-empty, readable PNG image."""
    import matplotlib.image

    assert path.is_file(), f"{path.name} was not written"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path.name
    assert image.std() > 0.01, f"{path.name} is blank"


def write_log(path, bleu=True):
    """A small metrics.jsonl as the trainer and validator write it."""
    records = []
    for epoch, step in enumerate((10, 20, 30), 1):
        records.append({"kind": "epoch", "epoch": epoch, "step": step, "train_loss": 3.0 / epoch, "lr": 1e-3,
                        "tokens_per_s": 100.0, "seconds": 1.0})
        valid = {"kind": "valid", "step": step, "epoch": epoch, "valid_loss": 2.5 / epoch, "seconds": 0.1}
        if bleu:
            valid.update(bleu=10.0 * epoch, chrf=20.0 * epoch)
        records.append(valid)
    if bleu:
        records.append({"kind": "test", "bleu": 31.0, "chrf": 55.0, "decoding": "greedy"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_checkpoint(path):
    """A tiny copy-task model (ids as text) saved as train.py saves one."""
    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(N=2, d_model=32, d_ff=64, h=4, dropout=0.0, tie_embeddings=True),
        decode=DecodeConfig(beam_size=1, max_len_a=1.0, max_len_b=0),  # the copy task's decoding
    )
    tok = IdTokenizer(11)
    model = build_model(cfg.model, tok)
    save_checkpoint(path, {"config": to_dict(cfg), "model": model.state_dict(), "tokenizer": tok.state_dict()})
    return path


# --------------------------------------------------------------------------- the command


def test_untrained_model_gives_every_figure_but_the_training_curve(tmp_path, capsys, caplog):
    out = tmp_path / "figures"
    assert main(["--out", str(out), "--layers", "2"]) == 0
    for name in FIGURES:
        if name != "training_curve":
            assert_png(out / f"{name}.png")
    assert not (out / "training_curve.png").exists()
    assert "skipped training_curve.png" in caplog.text
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(out / f"{name}.png") for name in FIGURES if name != "training_curve")


def test_checkpoint_figures_use_its_model_and_the_log_beside_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = write_checkpoint(run / "best.pt")
    write_log(run / "metrics.jsonl")
    out = tmp_path / "figures"
    # The figures that depend on the model or its run (the others are drawn above).
    names = ["positional_encoding", "noam_schedule", "attention_encoder", "attention_decoder_self",
             "attention_encoder_decoder", "training_curve"]
    args = ["--out", str(out), "--checkpoint", str(ckpt), "--sentence", "3 4 5 6", "--device", "cpu", "--only"]
    assert main(args + names) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.png" for name in names)
    for path in out.iterdir():
        assert_png(path)
    # The decoder reads <s> and the checkpoint's own translation of the sentence.
    translator = Translator.from_checkpoint(ckpt, device="cpu")
    source = checkpoint_input(translator, "3 4 5 6", None, ckpt.name)
    assert source.src_ids == [3, 4, 5, 6]
    assert source.tgt_ids == [translator.tokenizer.bos_id, *translator.translate_ids([[3, 4, 5, 6]])[0]]
    assert len(source.tgt_ids) == 5 and source.tgt_labels == [str(i) for i in source.tgt_ids]
    assert source.description == "trained: best.pt"


def test_bad_inputs_are_named(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "tiny.pt")
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "missing.pt"),
        (["--log", str(tmp_path / "nolog.jsonl")], "nolog.jsonl"),
        (["--checkpoint", str(ckpt), "--sentence", "3 4", "--layers", "3"], "--layers 3"),
        (["--checkpoint", str(ckpt), "--sentence", "Zwei Männer"], "not a symbol of the copy task"),
        (["--only", "attention"], "--only attention: no such figure"),
        (["--log", str(write_log(tmp_path / "m.jsonl")), "--only", "training_curve", "--layers", "0"], "--layers 0"),
    ]
    for args, named in cases:
        assert main(["--out", str(tmp_path / "out"), "--device", "cpu", *args]) == 2, args
        assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing is drawn before the inputs are checked


def test_figures_run_as_a_module(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "transformer.figures", "--out", str(tmp_path), "--log", str(tmp_path / "gone.jsonl")],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert "gone.jsonl" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- the training log


@pytest.mark.parametrize("bleu", [True, False])  # translation runs, and the copy task's losses only
def test_training_curve_from_a_log(tmp_path, bleu):
    records = read_metrics(write_log(tmp_path / "metrics.jsonl", bleu=bleu))
    assert [r["kind"] for r in records].count("valid") == 3
    assert_png(plot_training_curve(records, tmp_path / "curve.png", "a run"))


def test_unusable_logs_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "epoch", "step": 1, "train_loss": 2.0}\nnot json\n')
    with pytest.raises(FigureError, match=r"bad\.jsonl, line 2"):
        read_metrics(bad)
    with pytest.raises(FigureError, match=r"absent\.jsonl"):
        read_metrics(tmp_path / "absent.jsonl")
    with pytest.raises(FigureError, match="no 'epoch' or 'valid' records"):
        plot_training_curve([{"kind": "test", "bleu": 1.0}], tmp_path / "curve.png", "a run")


# --------------------------------------------------------------------------- what the figures show


def test_label_smoothing_penalty_is_finite_and_lowest_at_one_minus_eps():
    """The curve the reference drew through log(0): finite everywhere, -log p without
    smoothing, and with smoothing ε lowest where the model gives the target 1 − ε."""
    confidence = torch.linspace(0.004, 0.999, 200, dtype=torch.float64)  # steps of 0.005
    plain = smoothing_penalty(confidence, 10, 0.0)
    torch.testing.assert_close(plain, -confidence.log(), rtol=1e-6, atol=1e-6)
    for eps in (0.1, 0.3):
        loss = smoothing_penalty(confidence, 10, eps)
        assert torch.isfinite(loss).all()
        assert confidence[loss.argmin()].item() == pytest.approx(1 - eps, abs=0.003)
        assert loss[-1] > loss.min() + 0.1  # overconfidence costs


def test_dot_product_samples_of_the_scaling_figure():
    """The histograms' samples: variance d_k before scaling, 1 after (the claim itself is
    tested in test_maths.py; this checks the figure draws what it says)."""
    generator = torch.Generator().manual_seed(0)
    for d_k in (4, 512):
        dots, scaled = dot_products(d_k, 8000, generator)
        assert dots.var().item() == pytest.approx(d_k, rel=0.1)
        assert scaled.var().item() == pytest.approx(1.0, rel=0.1)


# --------------------------------------------------------------------------- the guide's claims


def one_sentence_and_a_crowd(d_model=16, length=5, seed=0):
    """One sentence's states; the same in a batch with two other sentences and extra padding.

    The other sentences have another mean and scale, as real batches do (other words,
    other lengths), so that statistics over the batch move.

    Shape:
        alone (1, length, d), crowd (3, length + 3, d): crowd[0, :length] is alone[0].
    """
    g = torch.Generator().manual_seed(seed)
    alone = torch.randn(1, length, d_model, generator=g, dtype=torch.float64)
    others = 3.0 + 2.0 * torch.randn(2, length + 3, d_model, generator=g, dtype=torch.float64)
    padded = torch.cat([alone, torch.zeros(1, 3, d_model, dtype=torch.float64)], dim=1)  # padding positions
    return alone, torch.cat([padded, others])


@pytest.mark.parametrize("crowd_of", ["sentences", "padding"])
def test_layer_norm_ignores_the_batch_and_batch_norm_does_not(crowd_of):
    """The model's LayerNorm normalises each position by itself: one sentence's output is
    the same alone, beside other sentences, or with extra padding. BatchNorm (training
    mode) normalises each feature over the batch and the positions, padding included, so
    the same sentence comes out different."""
    torch.manual_seed(0)
    model = make_model(11, 11, N=1, d_model=16, d_ff=32, h=4, dropout=0.0).double()
    norm = model.encoder.layers[0].sublayer[0].norm
    assert isinstance(norm, nn.LayerNorm)
    with torch.no_grad():  # a trained norm: not the identity affine map
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    alone, crowd = one_sentence_and_a_crowd()
    if crowd_of == "padding":
        crowd = crowd[:1]  # the sentence and its padding, no other sentence
    n = alone.size(1)
    torch.testing.assert_close(norm(crowd)[:1, :n], norm(alone), rtol=0, atol=1e-12)

    batch_norm = nn.BatchNorm1d(16).double().train()  # features in dim 1: (B, d, T)
    by_itself = batch_norm(alone.transpose(1, 2)).transpose(1, 2)
    in_crowd = batch_norm(crowd.transpose(1, 2)).transpose(1, 2)[:1, :n]
    assert (in_crowd - by_itself).abs().max() > 0.1


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_a_sentence_is_encoded_the_same_whatever_else_is_in_the_batch(norm):
    """LayerNorm and the padding mask together: the encoder's output for one sentence does
    not depend on the other sentences of its batch or on how much padding follows it."""
    torch.manual_seed(0)
    model = make_model(11, 11, N=2, d_model=16, d_ff=32, h=4, dropout=0.0, norm=norm).double().eval()
    sentence = torch.tensor([[5, 6, 7, 8, 2]])
    batch = torch.tensor([[5, 6, 7, 8, 2, 0, 0, 0], [9, 9, 4, 3, 3, 10, 7, 2], [4, 2, 0, 0, 0, 0, 0, 0]])
    alone = model.encode(sentence, padding_mask(sentence, 0))
    together = model.encode(batch, padding_mask(batch, 0))
    torch.testing.assert_close(together[:1, :5], alone, rtol=0, atol=1e-10)


def test_pre_norm_residual_path_is_the_identity():
    """x + dropout(sublayer(norm(x))): the block adds the sublayer's output to x, so a
    sublayer that outputs nothing leaves x, and its gradient, exactly as they were; the
    gradient reaches the bottom of a deep stack through the identity path."""
    torch.manual_seed(0)
    block = SublayerConnection(8, dropout=0.0, pre_norm=True).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    out = block(x, lambda h: torch.zeros_like(h))
    assert torch.equal(out, x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.ones_like(x))
    linear = nn.Linear(8, 8).double()
    out = block(x, linear)
    torch.testing.assert_close(out - x, linear(block.norm(x)), rtol=0, atol=1e-12)
    # Post-norm (the paper) normalises the sum instead, so even a silent sublayer changes x.
    post = SublayerConnection(8, dropout=0.0, pre_norm=False).double()
    assert not torch.allclose(post(x, lambda h: torch.zeros_like(h)), x)
    assert math.isclose(post(x, lambda h: torch.zeros_like(h)).std(-1, unbiased=False).mean().item(), 1.0,
                        rel_tol=1e-3)
