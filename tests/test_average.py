"""Checkpoint averaging: the article's average(), as a command."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_cli

from transformer.average import main
from transformer.config import Config, ModelConfig, to_dict
from transformer.data.tokenizers import IdTokenizer
from transformer.training.checkpoint import (
    CheckpointError,
    average_checkpoints,
    build_model,
    load_checkpoint,
    load_model,
    run_checkpoints,
    save_checkpoint,
)

MODEL = ModelConfig(N=1, d_model=32, d_ff=64, h=4, dropout=0.0, tie_embeddings=True)


def write(path, seed, model_cfg=MODEL, vocab=11, step=0):
    torch.manual_seed(seed)
    cfg = Config(model=model_cfg)
    tok = IdTokenizer(vocab)
    model = build_model(cfg.model, tok)
    save_checkpoint(path, {"config": to_dict(cfg), "model": model.state_dict(), "tokenizer": tok.state_dict(),
                           "step": step, "optimizer": {"state": {}, "param_groups": []}})
    return model.state_dict()


def test_averaging_identical_checkpoints_changes_nothing(tmp_path):
    weights = write(tmp_path / "a.pt", seed=0)
    write(tmp_path / "b.pt", seed=0)
    averaged = average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"])["model"]
    assert averaged.keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(averaged[name], value), name


def test_average_is_the_elementwise_mean(tmp_path):
    a, b, c = (write(tmp_path / f"{n}.pt", seed=s, step=s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    state = average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"])
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(state["model"][name], (a[name] + b[name] + c[name]) / 3)
    assert state["step"] == 3 and "optimizer" not in state  # the newest's step; not for resuming


@pytest.mark.parametrize("other", [
    {"model_cfg": ModelConfig(N=1, d_model=64, d_ff=64, h=4, dropout=0.0, tie_embeddings=True)},
    {"model_cfg": ModelConfig(N=2, d_model=32, d_ff=64, h=4, dropout=0.0, tie_embeddings=True)},
    {"vocab": 12},
])
def test_different_models_are_refused(tmp_path, other):
    write(tmp_path / "a.pt", seed=0)
    write(tmp_path / "other.pt", seed=0, **other)
    with pytest.raises(CheckpointError, match="other.pt"):
        average_checkpoints([tmp_path / "a.pt", tmp_path / "other.pt"])


def test_average_command_on_a_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for step in (100, 200, 300, 1000):
        write(run / f"step-{step}.pt", seed=step, step=step)
    assert [p.name for p in run_checkpoints(run, 3)] == ["step-200.pt", "step-300.pt", "step-1000.pt"]
    out = tmp_path / "avg.pt"
    assert main([str(run), "--last", "3", "-o", str(out)]) == 0
    model, tok, cfg = load_model(out)  # usable like any checkpoint
    assert cfg.model == MODEL and load_checkpoint(out)["averaged_from"][-1].endswith("step-1000.pt")
    assert main([str(run), "--last", "5", "-o", str(tmp_path / "x.pt")]) == 2
    assert "fewer than the 5" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_translate_uses_an_averaged_checkpoint(tmp_path):
    write(tmp_path / "a.pt", seed=0)
    write(tmp_path / "b.pt", seed=1)
    result = subprocess.run(
        [sys.executable, "-m", "transformer.average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"),
         "-o", str(tmp_path / "avg.pt")], capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    result = run_cli("translate.py", "--checkpoint", str(tmp_path / "avg.pt"), "3 4 5")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) > 0
