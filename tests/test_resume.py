"""Resuming: an interrupted run, resumed, ends exactly where the uninterrupted one does."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from conftest import ROOT, run_cli

from transformer.config import load_config
from transformer.training.checkpoint import load_checkpoint
from transformer.training.run import resume_state, run_training, stop_on_signals
from transformer.training.trainer import Trainer

# The copy task, small; dropout on, so the random number generator's state matters too;
# 12 steps over epochs of 5 batches, validating every 4 steps.
SETTINGS = [
    "model.N=1", "model.d_model=32", "model.d_ff=64", "model.h=4", "model.dropout=0.2",
    "data.copy.train_batches=5", "data.copy.batch_size=16", "train.max_steps=12", "train.eval_every=4",
    "train.keep_checkpoints=2",
]


def config(run_dir, *extra):
    return load_config(ROOT / "configs" / "copy.yaml", [*SETTINGS, f"train.run_dir={run_dir}", *extra])


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stop_at, extra", [
    (6, []), (8, []), (10, []),  # inside an epoch; at a validation; at an epoch's end
    (7, ["train.cooldown=0.5"]),  # inside the cooldown, which counts steps from the start
    (6, ["train.amp=bf16-weights"]),  # the bf16 copy is made again from the fp32 weights
])
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch, stop_at, extra):
    whole = tmp_path / "whole"
    run_training(config(whole, *extra))

    interrupted = tmp_path / "interrupted"
    train_step = Trainer.train_step

    def stop_after(self, group):
        out = train_step(self, group)
        if self.state.step == stop_at:
            self.stopping.requested = True  # what SIGINT does
        return out

    monkeypatch.setattr(Trainer, "train_step", stop_after)
    first = run_training(config(interrupted, *extra))
    assert first.interrupted == signal.SIGINT
    assert load_checkpoint(interrupted / "last.pt")["step"] == stop_at
    monkeypatch.setattr(Trainer, "train_step", train_step)
    state = resume_state(interrupted)
    run_training(load_config(None, [], base=state["config"]), resume=(interrupted, state))

    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(interrupted / "last.pt")
    assert a["step"] == b["step"] == 12
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for name in ("optimizer", "scheduler"):
        assert str(a["trainer"][name]) == str(b["trainer"][name])
    valid = lambda run: [(r["step"], r["valid_loss"]) for r in records(run) if r["kind"] == "valid"]  # noqa: E731
    assert valid(whole) == valid(interrupted)
    # Every epoch's last report (an epoch cut by the interruption reports again, whole,
    # after the resume) gives the same training loss.
    epochs = lambda run: {r["epoch"]: r["train_loss"] for r in records(run) if r["kind"] == "epoch"}  # noqa: E731
    assert epochs(interrupted) == epochs(whole)
    assert sorted(p.name for p in interrupted.glob("step-*.pt")) == ["step-12.pt", "step-8.pt"]


def test_resume_errors_name_the_problem(tmp_path):
    run = tmp_path / "nothing"
    run.mkdir()
    result = run_cli("train.py", "--resume", str(run))
    assert result.returncode == 2 and "last.pt" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("train.py", "--resume", str(run), "--set", "model.d_model=64")
    assert result.returncode == 2 and "'model.d_model' cannot change when resuming" in result.stderr
    result = run_cli("train.py", "--resume", str(run), "--set", "train.best_metric=loss")
    assert result.returncode == 2 and "'train.best_metric' cannot change when resuming" in result.stderr
    result = run_cli("train.py", "--resume", str(run), "--config", "configs/copy.yaml")
    assert result.returncode == 2 and "--resume" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_and_stops_cleanly_then_resume_finishes(tmp_path, sig):
    run_dir = tmp_path / "run"
    settings = [a for s in SETTINGS[:-3] for a in ("--set", s)]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--config", "configs/copy.yaml", *settings,
         "--set", "train.max_steps=100000", "--set", "train.eval_every=50", "--set", "train.epochs=100000",
         "--set", f"train.run_dir={run_dir}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.stat().st_size > 0):  # the first epoch is done
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and f"--resume {run_dir}" in err
    step = load_checkpoint(run_dir / "last.pt")["step"]
    assert step > 0
    result = run_cli("train.py", "--resume", str(run_dir), "--set", f"train.max_steps={step + 3}")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(run_dir / "last.pt")["step"] == step + 3


def test_a_second_sigint_interrupts_at_once():
    """The first SIGINT only asks for a stop at the next step; the second raises at once;
    on leaving, the previous handlers are back."""
    trainer = types.SimpleNamespace(stopping=types.SimpleNamespace(requested=False))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with stop_on_signals(trainer) as received:
            os.kill(os.getpid(), signal.SIGINT)
            assert trainer.stopping.requested and received == [signal.SIGINT]
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; never reached
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_signal_during_a_log_write_does_not_reenter_the_log_stream(capfd):
    """A signal landing while a log record is being written (here: its stream sends the
    signal from inside ``write``) is handled without writing to any log stream again."""
    class SignallingStream:
        def __init__(self):
            self.inside, self.reentered, self.signalled, self.lines = False, False, False, []

        def write(self, text):
            self.reentered |= self.inside
            self.inside = True
            try:
                if not self.signalled:
                    self.signalled = True
                    os.kill(os.getpid(), signal.SIGTERM)
                    for _ in range(1000):  # bytecodes for the handler to run between
                        pass
                self.lines.append(text)
            finally:
                self.inside = False

        def flush(self):
            pass

    trainer = types.SimpleNamespace(stopping=types.SimpleNamespace(requested=False))
    stream = SignallingStream()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("transformer")
    logger.addHandler(handler)
    try:
        with stop_on_signals(trainer) as received:
            logging.getLogger("transformer.training").warning("a record being written")
    finally:
        logger.removeHandler(handler)
    assert received == [signal.SIGTERM] and trainer.stopping.requested
    assert not stream.reentered and stream.lines == ["a record being written\n"]
    assert "SIGTERM: stopping after this step" in capfd.readouterr().err
