"""train.py and translate.py end to end, in fresh interpreters."""

import json

import pytest
from conftest import run_cli

from transformer.config import load_config
from transformer.translate import Translator

TINY = ["--set", "model.N=1", "--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "model.h=4"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    result = run_cli("train.py", "--config", "configs/copy.yaml", *TINY,
                     "--set", f"train.run_dir={run_dir}", "--set", "train.max_steps=3")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_train_writes_its_run_directory(tiny_run, root):
    run_dir, result = tiny_run
    assert result.stdout.strip() == str(run_dir)
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "train.log"):
        assert (run_dir / name).is_file(), name
    # The resolved config, overrides included, is what the run used.
    written = load_config(run_dir / "config.yaml")
    assert written == load_config(root / "configs/copy.yaml", [
        "model.N=1", "model.d_model=32", "model.d_ff=64", "model.h=4", f"train.run_dir={run_dir}", "train.max_steps=3"
    ])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("epoch", 3), ("valid", 3)]


def test_train_refuses_to_overwrite_a_run(tiny_run):
    run_dir, _ = tiny_run
    result = run_cli("train.py", "--config", "configs/copy.yaml", *TINY, "--set", f"train.run_dir={run_dir}")
    assert result.returncode == 2
    assert "train.run_dir" in result.stderr and "already holds a run" in result.stderr


def test_train_config_errors_name_the_key(tmp_path):
    result = run_cli("train.py", "--config", "configs/copy.yaml", "--set", "train.warmpu=10")
    assert result.returncode == 2
    assert "train.warmpu" in result.stderr and "did you mean 'train.warmup'" in result.stderr
    assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  heads: 4\n")
    result = run_cli("train.py", "--config", str(bad))
    assert result.returncode == 2 and "bad.yaml" in result.stderr and "model.heads" in result.stderr


def test_translate_keeps_lines_aligned(tiny_run):
    run_dir, _ = tiny_run
    result = run_cli("translate.py", "--checkpoint", str(run_dir / "last.pt"), input="3 4 5\n\n7 8 9 10 2\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""
    assert len(lines[0].split()) == 3 and len(lines[2].split()) == 5  # a copy is as long as its source


def test_translate_errors_are_clear(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    result = run_cli("translate.py", "--checkpoint", str(tmp_path / "missing.pt"), "1 2")
    assert result.returncode == 2 and "missing.pt" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("translate.py", "--checkpoint", str(run_dir / "last.pt"), "1 2 99")
    assert result.returncode == 2 and "'99'" in result.stderr
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    result = run_cli("translate.py", "--checkpoint", str(run_dir / "last.pt"), "--input", str(bad))
    assert result.returncode == 2 and "latin1.txt" in result.stderr and "UTF-8" in result.stderr


@pytest.mark.slow
def test_copy_task_end_to_end(tmp_path):
    """configs/copy.yaml learns to copy: the run's own demo and translate.py copy exactly."""
    run_dir = tmp_path / "copy"
    result = run_cli("train.py", "--config", "configs/copy.yaml", "--set", f"train.run_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert "copied 5 of 5 sequences exactly" in result.stderr
    ckpt = run_dir / "last.pt"
    result = run_cli("translate.py", "--checkpoint", str(ckpt), "1 2 3 4 5 6 7 8 9 10")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1 2 3 4 5 6 7 8 9 10\n"
    # From Python, on fresh random sequences of length 10 and shorter, cached and uncached.
    import random

    rng = random.Random(0)
    sources = [" ".join(str(rng.randint(1, 10)) for _ in range(rng.choice([10, rng.randint(1, 10)])))
               for _ in range(30)]
    for cache in (True, False):
        translator = Translator.from_checkpoint(ckpt, device="cpu", cache=cache)
        assert translator.translate(sources) == sources
