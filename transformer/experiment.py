"""A training run from a config: run directory, task, model, trainer, checkpoints."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transformer.checkpoint import build_model, save_checkpoint
from transformer.config import Config, ConfigError, save_config, to_dict
from transformer.copy_task import CopyTask
from transformer.model import EncoderDecoder
from transformer.tokenize import Tokenizer
from transformer.train import EpochSummary, Trainer
from transformer.translate import Translator
from transformer.utils import MetricsLog, resolve_device, setup_logging

log = logging.getLogger(__name__)


def build_task(cfg: Config) -> CopyTask:
    if cfg.data.task == "copy":
        return CopyTask(cfg.data.copy, cfg.train.seed)
    raise ConfigError(f"'data.task': unknown task {cfg.data.task!r}")


def new_run_dir(cfg: Config, name: str) -> Path:
    """The run's own folder: ``train.run_dir`` if set (and not already holding a run),
    else a new timestamped folder under ``train.runs_root``."""
    if cfg.train.run_dir is not None:
        run_dir = Path(cfg.train.run_dir)
        if run_dir.exists() and ((run_dir / "config.yaml").exists() or any(run_dir.glob("*.pt"))):
            raise ConfigError(f"'train.run_dir': {run_dir} already holds a run; choose a new folder")
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    root = Path(cfg.train.runs_root)
    stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(1, 1000):
        run_dir = root / (stem if i == 1 else f"{stem}-{i}")
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            continue
    raise ConfigError(f"'train.runs_root': cannot make a new run folder under {root}")


def checkpoint_state(cfg: Config, model: EncoderDecoder, tokenizer: Tokenizer, trainer: Trainer) -> dict[str, Any]:
    """Everything needed to translate with, or continue training, this model."""
    return {
        "config": to_dict(cfg),
        "model": model.state_dict(),
        "tokenizer": tokenizer.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "step": trainer.step,
        "epoch": trainer.epoch,
    }


@dataclass
class RunResult:
    run_dir: Path
    epochs: list[EpochSummary]
    demo: list[tuple[str, str]]  # (source, output) pairs decoded at the end


def run_training(cfg: Config, name: str = "run", demo_sentences: int = 5) -> RunResult:
    """Train as ``cfg`` says, save ``last.pt`` after every epoch, then decode a few
    sentences with the result."""
    run_dir = new_run_dir(cfg, name)
    handler = setup_logging(run_dir / "train.log")
    try:
        return _run(cfg, run_dir, demo_sentences)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _run(cfg: Config, run_dir: Path, demo_sentences: int) -> RunResult:
    save_config(cfg, run_dir / "config.yaml")
    log.info("run directory: %s", run_dir)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg)
    model = build_model(cfg.model, task.tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s parameters, device %s, amp %s", f"{n_params:,}", device, cfg.train.amp)
    trainer = Trainer(model, cfg.train, task.tokenizer.pad_id, device, MetricsLog(run_dir / "metrics.jsonl"))

    def save(trainer: Trainer, summary: EpochSummary) -> None:
        save_checkpoint(run_dir / "last.pt", checkpoint_state(cfg, model, task.tokenizer, trainer))

    epochs = trainer.fit(task.train_batches, task.valid_batches, on_epoch_end=save)
    log.info("saved %s", run_dir / "last.pt")

    translator = Translator(model, task.tokenizer, cfg.decode, device)
    sources = task.demo_sources(demo_sentences)
    outputs = translator.translate(sources)
    for src, out in zip(sources, outputs):
        log.info("decode: %s -> %s", src, out)
    if cfg.data.task == "copy":
        exact = sum(src == out for src, out in zip(sources, outputs))
        log.info("copied %d of %d sequences exactly", exact, len(sources))
    return RunResult(run_dir, epochs, list(zip(sources, outputs)))
