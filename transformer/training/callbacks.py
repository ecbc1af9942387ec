"""What happens around the training steps: the progress bar, the epoch log, validation.

Each is a ``Callback`` the run hands to the ``Trainer``. With several processes every
process has the same callbacks (their collectives must match); only rank 0 shows a
bar, writes files and logs at the info level.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from transformer.config import Config, to_dict
from transformer.inference.translator import Translator
from transformer.tasks import Task
from transformer.training.checkpoint import save_checkpoint, step_checkpoints
from transformer.training.distributed import Distributed
from transformer.training.trainer import Callback, EpochSummary, Trainer

log = logging.getLogger(__name__)


class MetricsLog:
    """Append one JSON object per line to a file (the run's machine-readable log)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, **record: Any) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class ProgressBar(Callback):
    """A bar per epoch (on a terminal) with the loss per target token, the learning rate
    and target tokens/s, refreshed every ``train.log_every`` steps: the only time the
    loop waits for the device."""

    def on_epoch_start(self, trainer: Trainer, steps: int | None) -> None:
        cfg, state = trainer.cfg, trainer.state
        self.bar = tqdm(total=steps, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", unit="step",
                        disable=None if trainer.dist.is_main else True, leave=False)
        self.bar.update(state.batch_in_epoch // trainer.group_size)
        self._reset(trainer)

    def _reset(self, trainer: Trainer) -> None:
        self.loss, self.tokens, self.since = torch.zeros((), device=trainer.device), 0, trainer.epoch_seconds

    def on_step(self, trainer: Trainer, loss: torch.Tensor, ntokens: int) -> None:
        self.loss += loss
        self.tokens += ntokens
        self.bar.update(1)
        if trainer.state.step % trainer.cfg.log_every == 0:
            seconds = trainer.epoch_seconds - self.since
            self.bar.set_postfix(loss=f"{trainer.dist.sum([self.loss.item()])[0] / max(self.tokens, 1):.3f}",
                                 lr=f"{trainer.lr:.2e}", tok_s=f"{self.tokens / max(seconds, 1e-9):.0f}")
            self._reset(trainer)

    def on_epoch_end(self, trainer: Trainer, summary: EpochSummary) -> None:
        self.bar.close()


class EpochLog(Callback):
    """A log line and a ``metrics.jsonl`` record for every epoch (and for one cut short)."""

    def __init__(self, metrics: MetricsLog | None):
        self.metrics = metrics

    def on_epoch_end(self, trainer: Trainer, summary: EpochSummary) -> None:
        log.info("epoch %d%s: step %d, train loss %.4f, lr %.2e, %.0f target tokens/s, %.1f s",
                 summary.epoch, "" if summary.complete else " (stopped inside it)", summary.step,
                 summary.train_loss, summary.lr, summary.tokens_per_s, summary.seconds)
        if self.metrics is not None:
            record = dataclasses.asdict(summary)
            del record["complete"]
            self.metrics.write(kind="epoch", **record)


class Checkpoints:
    """The run's checkpoint files, written by rank 0: ``last.pt`` at every evaluation
    point, ``best.pt`` when the model improves (``train.best_metric``), and
    ``step-<N>.pt`` for the last ``keep`` evaluation points (for averaging)."""

    def __init__(self, run_dir: Path, keep: int, dist: Distributed):
        self.run_dir, self.keep, self.dist = run_dir, keep, dist

    def save(self, state: dict[str, Any], step: int | None = None, best: bool = False) -> None:
        """Write ``last.pt``, and with ``step`` the evaluation point's files."""
        if not self.dist.is_main:
            return
        save_checkpoint(self.run_dir / "last.pt", state)
        if step is not None and self.keep:
            save_checkpoint(self.run_dir / f"step-{step}.pt", state)
            for old in step_checkpoints(self.run_dir)[: -self.keep]:
                old.unlink()
        if best:
            save_checkpoint(self.run_dir / "best.pt", state)


class Validator(Callback):
    """Every evaluation point of a run: every ``train.eval_every`` steps, else at the end
    of every epoch (and whenever the run calls it).

    It measures the validation loss, has the task score the model (``Task.score``,
    greedy), saves the checkpoints, and stops training after ``train.patience``
    evaluations without a better score, or loss (``train.best_metric``). With several
    processes every one calls it: rank 0 validates and writes, the others give their
    part of the checkpoint (their generators' states) and receive its decision to stop.
    """

    def __init__(self, cfg: Config, task: Task, run_dir: Path, metrics: MetricsLog | None, device: torch.device,
                 dist: Distributed | None = None):
        self.cfg, self.task, self.metrics, self.device = cfg, task, metrics, device
        self.dist = dist if dist is not None else Distributed(device=device)
        self.checkpoints = Checkpoints(run_dir, cfg.train.keep_checkpoints, self.dist)
        self.best: float | None = None
        self.bad_evals = 0
        self.last_step = -1

    def on_step(self, trainer: Trainer, loss: torch.Tensor, ntokens: int) -> None:
        every = trainer.cfg.eval_every
        if every and trainer.state.step % every == 0:
            trainer.stopping.early = self(trainer)
            trainer.model.train()

    def on_epoch_end(self, trainer: Trainer, summary: EpochSummary) -> None:
        if summary.complete and not trainer.cfg.eval_every and not trainer.stopping.done(trainer.state):
            trainer.stopping.early = self(trainer)

    def __call__(self, trainer: Trainer) -> bool:
        """Validate and save now; returns whether to stop early."""
        step = self.last_step = trainer.state.step
        if not self.dist.is_main:
            self.save(trainer)
            return self.dist.broadcast(False)
        start = time.perf_counter()
        record: dict[str, Any] = {"kind": "valid", "step": step, "epoch": trainer.state.epoch}
        record["valid_loss"] = trainer.evaluate(self.task.valid_batches())
        # Greedy: beam search at every evaluation point would cost more than it tells.
        greedy = dataclasses.replace(self.cfg.decode, beam_size=1, nbest=1)
        score = self.task.score(Translator(trainer.model, self.task.tokenizer, greedy, self.device), record["valid_loss"])
        record.update(score.metrics)
        # Kept as "higher is better" either way: the loss is stored negated.
        value = -record["valid_loss"] if self.cfg.train.best_metric == "loss" else score.value
        improved = self.best is None or value > self.best
        self.best, self.bad_evals = (value, 0) if improved else (self.best, self.bad_evals + 1)
        self.save(trainer, step, best=improved)
        record["seconds"] = time.perf_counter() - start
        self.metrics.write(**record)
        text = ", ".join([f"valid loss {record['valid_loss']:.4f}", *([score.text] if score.text else [])])
        log.info("step %d: %s%s (%.1f s)", step, text, ", new best" if improved else "", record["seconds"])
        patience = self.cfg.train.patience
        stop = patience is not None and self.bad_evals >= patience
        if stop:
            log.info("no improvement in %d validations: stopping early", patience)
        return self.dist.broadcast(stop)

    def save(self, trainer: Trainer, step: int | None = None, best: bool = False) -> None:
        """Write ``last.pt`` (what ``train.py --resume`` continues from) and, at an
        evaluation point, its other files. Every process must call this (a collective)."""
        self.checkpoints.save(self.checkpoint(trainer), step, best)

    def checkpoint(self, trainer: Trainer) -> dict[str, Any]:
        """Everything needed to translate with, or continue training exactly, this model."""
        return {
            "config": to_dict(self.cfg), "model": trainer.model.state_dict(), "tokenizer": self.task.tokenizer.state_dict(),
            "trainer": trainer.state_dict(), "step": trainer.state.step, "epoch": trainer.state.epoch,
            "validator": self.state_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals, self.last_step = state["best"], state["bad_evals"], state["last_step"]
