"""A training run from a config: run directory, task, model, trainer, checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transformer.checkpoint import build_model, save_checkpoint
from transformer.config import Config, ConfigError, save_config, to_dict
from transformer.copy_task import CopyTask
from transformer.evaluate import score
from transformer.model import EncoderDecoder
from transformer.tokenize import Tokenizer
from transformer.train import EpochSummary, Trainer
from transformer.translate import Translator, decoding_name
from transformer.translation_task import TranslationTask
from transformer.utils import MetricsLog, resolve_device, setup_logging

log = logging.getLogger(__name__)


def build_task(cfg: Config) -> CopyTask | TranslationTask:
    if cfg.data.task == "copy":
        return CopyTask(cfg.data.copy, cfg.train.seed)
    return TranslationTask(cfg)


def new_run_dir(cfg: Config, name: str) -> Path:
    """The run's own folder: ``train.run_dir`` if set (and not already holding a run),
    else a new timestamped folder under ``train.runs_root``."""
    if cfg.train.run_dir is not None:
        run_dir = Path(cfg.train.run_dir)
        # A folder with checkpoints holds work to keep; one left by a run that failed
        # before its first checkpoint (bad data, say) may be reused.
        if (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists():
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


class Validator:
    """What happens at every evaluation point of a run.

    It measures the validation loss (and, for translation, greedy BLEU and chrF on the
    validation text), saves ``last.pt``, saves ``best.pt`` when the score improves
    (BLEU for translation, loss for the copy task), and asks to stop after
    ``train.patience`` evaluations without improvement.
    """

    def __init__(self, cfg: Config, task, run_dir: Path, metrics: MetricsLog, device: torch.device):
        self.cfg, self.task, self.run_dir, self.metrics, self.device = cfg, task, run_dir, metrics, device
        self.best: float | None = None
        self.bad_evals = 0
        self.last_step = -1

    def __call__(self, trainer: Trainer) -> bool:
        self.last_step = trainer.step
        start = time.perf_counter()
        record: dict[str, Any] = {"kind": "valid", "step": trainer.step, "epoch": trainer.epoch}
        record["valid_loss"] = trainer.evaluate(self.task.valid_batches())
        text = f"valid loss {record['valid_loss']:.4f}"
        if isinstance(self.task, TranslationTask):
            # Greedy: beam search at every evaluation point would cost more than it tells.
            greedy = dataclasses.replace(self.cfg.decode, beam_size=1, nbest=1)
            translator = Translator(trainer.model, self.task.tokenizer, greedy, self.device)
            scores = score(translator.translate(self.task.valid_src), self.task.valid_ref)
            record.update(bleu=scores.bleu, chrf=scores.chrf)
            current = scores.bleu
            text += f", BLEU {scores.bleu:.2f}, chrF {scores.chrf:.2f} (greedy)"
        else:
            current = -record["valid_loss"]
        improved = self.best is None or current > self.best
        state = checkpoint_state(self.cfg, trainer.model, self.task.tokenizer, trainer)
        save_checkpoint(self.run_dir / "last.pt", state)
        self._keep(state, trainer.step)
        if improved:
            self.best, self.bad_evals = current, 0
            save_checkpoint(self.run_dir / "best.pt", state)
        else:
            self.bad_evals += 1
        record["seconds"] = time.perf_counter() - start
        self.metrics.write(**record)
        log.info("step %d: %s%s (%.1f s)", trainer.step, text, ", new best" if improved else "", record["seconds"])
        patience = self.cfg.train.patience
        if patience is not None and self.bad_evals >= patience:
            log.info("no improvement in %d validations: stopping early", patience)
            return True
        return False


    def _keep(self, state: dict[str, Any], step: int) -> None:
        """Save this evaluation point as step-<step>.pt and drop the ones beyond the last N."""
        n = self.cfg.train.keep_checkpoints
        if n == 0:
            return
        save_checkpoint(self.run_dir / f"step-{step}.pt", state)
        kept = sorted(self.run_dir.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        for old in kept[:-n]:
            old.unlink()


@dataclass
class RunResult:
    run_dir: Path
    epochs: list[EpochSummary]
    demo: list[tuple[str, str]]  # a few (source, output) pairs decoded at the end


def run_training(cfg: Config, name: str = "run", demo_sentences: int = 5) -> RunResult:
    """Train as ``cfg`` says (validating, and saving ``last.pt`` and ``best.pt``, at every
    evaluation point), then score the best model on the test set (translation) or
    decode a few sequences (copy task)."""
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
    save_checkpoint(run_dir / "tokenizer.pt", {"tokenizer": task.tokenizer.state_dict()})
    model = build_model(cfg.model, task.tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s parameters, device %s, amp %s", f"{n_params:,}", device, cfg.train.amp)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    trainer = Trainer(model, cfg.train, task.tokenizer.pad_id, device, metrics)
    validate = Validator(cfg, task, run_dir, metrics, device)
    epochs = trainer.fit(task.train_batches, validate)
    if validate.last_step != trainer.step:  # the run ended between two evaluation points
        validate(trainer)
    log.info("saved %s and %s", run_dir / "last.pt", run_dir / "best.pt")

    if isinstance(task, TranslationTask):
        return RunResult(run_dir, epochs, _test(task, run_dir, metrics, device, demo_sentences))
    translator = Translator(model, task.tokenizer, cfg.decode, device)
    sources = task.demo_sources(demo_sentences)
    outputs = translator.translate(sources)
    for src, out in zip(sources, outputs):
        log.info("decode: %s -> %s", src, out)
    exact = sum(src == out for src, out in zip(sources, outputs))
    log.info("copied %d of %d sequences exactly", exact, len(sources))
    return RunResult(run_dir, epochs, list(zip(sources, outputs)))


def _test(task: TranslationTask, run_dir: Path, metrics: MetricsLog, device, n_demo: int):
    """Score the best checkpoint on the test set; write its translations beside it."""
    if not task.test_src:
        return []
    translator = Translator.from_checkpoint(run_dir / "best.pt", device=str(device))
    hypotheses = translator.translate(task.test_src)
    (run_dir / "test.hyp.txt").write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    scores = score(hypotheses, task.test_ref)
    decoding = decoding_name(translator.cfg)
    metrics.write(kind="test", bleu=scores.bleu, chrf=scores.chrf, bleu_lc=scores.bleu_lc,
                  signature=scores.bleu_signature, decoding=decoding)
    log.info("test (best.pt, %s): %s", decoding, scores.summary())
    demo = list(zip(task.test_src[:n_demo], hypotheses[:n_demo]))
    for src, out in demo:
        log.info("decode: %s -> %s", src, out)
    return demo
