"""A training run from a config: run directory, task, model, trainer, checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transformer.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from transformer.config import Config, ConfigError, FinetuneConfig, load_config, save_config, to_dict
from transformer.copy_task import CopyTask
from transformer.distributed import Distributed, distributed
from transformer.evaluate import score
from transformer.model import EncoderDecoder
from transformer.tokenize import Tokenizer, tokenizer_from_state
from transformer.train import EpochSummary, Trainer
from transformer.translate import Translator, decoding_name
from transformer.translation_task import TranslationTask
from transformer.utils import MetricsLog, setup_logging

log = logging.getLogger(__name__)


def build_task(cfg: Config, tokenizer: Tokenizer | None = None) -> CopyTask | TranslationTask:
    """The task's data; a translation task learns its tokenizer unless one is given."""
    if cfg.data.task == "copy":
        return CopyTask(cfg.data.copy, cfg.train.seed)
    return TranslationTask(cfg, tokenizer)


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


def checkpoint_state(
    cfg: Config, model: EncoderDecoder, tokenizer: Tokenizer, trainer: Trainer, validator: "Validator | None" = None
) -> dict[str, Any]:
    """Everything needed to translate with, or continue training exactly, this model."""
    state = {
        "config": to_dict(cfg),
        "model": model.state_dict(),
        "tokenizer": tokenizer.state_dict(),
        "trainer": trainer.state_dict(),
        "step": trainer.step,
        "epoch": trainer.epoch,
    }
    if validator is not None:
        state["validator"] = validator.state_dict()
    return state


class Validator:
    """What happens at every evaluation point of a run.

    It measures the validation loss (and, for translation, greedy BLEU and chrF on the
    validation text), saves ``last.pt``, saves ``best.pt`` when the score improves
    (BLEU for translation, loss for the copy task), and asks to stop after
    ``train.patience`` evaluations without improvement.

    With several processes every one calls it: rank 0 validates and writes, the others
    only give their part of the checkpoint (their generators' states) and receive its
    decision to stop.
    """

    def __init__(
        self, cfg: Config, task, run_dir: Path, metrics: MetricsLog | None, device: torch.device,
        dist: Distributed | None = None,
    ):
        self.cfg, self.task, self.run_dir, self.metrics, self.device = cfg, task, run_dir, metrics, device
        self.dist = dist if dist is not None else Distributed(device=device)
        self.best: float | None = None
        self.bad_evals = 0
        self.last_step = -1

    def __call__(self, trainer: Trainer) -> bool:
        self.last_step = trainer.step
        if not self.dist.is_main:
            self.save(trainer)
            return self.dist.broadcast(False)
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
        if improved:
            self.best, self.bad_evals = current, 0
        else:
            self.bad_evals += 1
        state = self.save(trainer)
        self._keep(state, trainer.step)
        if improved:
            save_checkpoint(self.run_dir / "best.pt", state)
        record["seconds"] = time.perf_counter() - start
        self.metrics.write(**record)
        log.info("step %d: %s%s (%.1f s)", trainer.step, text, ", new best" if improved else "", record["seconds"])
        patience = self.cfg.train.patience
        stop = patience is not None and self.bad_evals >= patience
        if stop:
            log.info("no improvement in %d validations: stopping early", patience)
        return self.dist.broadcast(stop)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals, self.last_step = state["best"], state["bad_evals"], state["last_step"]

    def save(self, trainer: Trainer) -> dict[str, Any]:
        """Write ``last.pt``: the newest state, which ``train.py --resume`` continues from
        (rank 0 writes it; every process must call this)."""
        state = checkpoint_state(self.cfg, trainer.model, self.task.tokenizer, trainer, self)
        if self.dist.is_main:
            save_checkpoint(self.run_dir / "last.pt", state)
        return state

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
    interrupted: int | None = None  # the signal that stopped the run early, if one did
    main: bool = True  # False in the processes other than rank 0 of a torchrun launch


def resume_state(run_dir: Path) -> dict[str, Any]:
    """The newest checkpoint of a run (``last.pt``), checked to hold a training state."""
    state = load_checkpoint(Path(run_dir) / "last.pt")
    if "trainer" not in state or "validator" not in state:
        raise CheckpointError(
            f"{Path(run_dir) / 'last.pt'}: holds weights but no training state to resume "
            "(an averaged checkpoint, or one from an older version)"
        )
    return state


# What a fine-tuned model takes from its checkpoint (and a config may not contradict):
# the model's shape and the tokenizer's settings. Dropout may change.
INHERITED = {
    "model": ("N", "d_model", "d_ff", "h", "norm", "attention", "tie_embeddings", "max_len"),
    "data": ("tokenizer", "vocab_size", "sp_model_type", "min_freq", "src_lang", "tgt_lang"),
}


def finetune_config(path: Path, overrides: list[str], checkpoint: Path) -> tuple[Config, dict[str, Any]]:
    """The config of a run that starts from ``checkpoint``: the file and overrides laid
    over the checkpoint's model and tokenizer settings.

    Raises:
        ConfigError: when the file or an override sets one of those to another value.
    """
    state = load_checkpoint(checkpoint)
    old = state["config"]
    base = {section: {k: old[section][k] for k in keys if k in old.get(section, {})} for section, keys in INHERITED.items()}
    cfg = load_config(path, [*overrides, f"finetune.init_from={checkpoint}"], base=base)
    new = to_dict(cfg)
    for section, keys in INHERITED.items():
        for key in keys:
            if key in base[section] and new[section][key] != base[section][key]:
                raise ConfigError(
                    f"'{section}.{key}' is {new[section][key]!r} here but {base[section][key]!r} in {checkpoint}: "
                    "a fine-tuned model keeps its checkpoint's shape and vocabulary"
                )
    return cfg, state


def freeze(model: EncoderDecoder, cfg: FinetuneConfig) -> None:
    """Stop training the parts ``cfg`` names (their parameters get no gradient)."""
    parts = []
    if cfg.freeze_embeddings:
        parts += [model.src_embed, model.tgt_embed]  # with tied embeddings, the output layer's weight too
    if cfg.freeze_encoder:
        parts.append(model.encoder)
    for part in parts:
        for param in part.parameters():
            param.requires_grad_(False)


def run_training(
    cfg: Config, name: str = "run", demo_sentences: int = 5, resume: tuple[Path, dict[str, Any]] | None = None
) -> RunResult:
    """Train as ``cfg`` says (validating, and saving ``last.pt`` and ``best.pt``, at every
    evaluation point), then score the best model on the test set (translation) or
    decode a few sequences (copy task).

    Args:
        resume: (run directory, its ``resume_state``): continue that run where its
            checkpoint left it, in the same folder, instead of starting a new one.

    SIGINT and SIGTERM stop the run at the next step boundary, after saving ``last.pt``
    (a second SIGINT stops at once); the result then says which signal it was.

    Launched by ``torchrun`` (see ``transformer.distributed``), each process trains on
    its share of every step; rank 0 makes the run directory and writes the logs, the
    checkpoints and the test scores, and the others log warnings only.
    """
    with distributed(cfg.train.device) as dist:
        run_dir = resume[0] if resume is not None else dist.on_main(lambda: new_run_dir(cfg, name))
        handler = setup_logging(run_dir / "train.log") if dist.is_main else setup_logging(level=logging.WARNING)
        try:
            return _run(cfg, run_dir, demo_sentences, resume[1] if resume is not None else None, dist)
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()


@contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[list[int]]:
    """While inside, SIGINT or SIGTERM asks ``trainer`` to stop at the next step boundary
    (the yielded list receives the signal); a second SIGINT interrupts at once."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield received
        return

    def request_stop(signum, frame):
        received.append(signum)
        trainer.stop_requested = True
        log.warning(
            "%s: stopping after this step, with a checkpoint; press Ctrl-C again to stop at once",
            signal.Signals(signum).name,
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _run(
    cfg: Config, run_dir: Path, demo_sentences: int, resumed: dict[str, Any] | None, dist: Distributed
) -> RunResult:
    device = dist.device
    start = None  # the checkpoint a fine-tuning run starts from
    if resumed is None:
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml")
        log.info("run directory: %s", run_dir)
        if cfg.finetune.init_from is not None:
            start = load_checkpoint(cfg.finetune.init_from)
            log.info("starting from %s (step %s)", cfg.finetune.init_from, start.get("step"))
    else:
        log.info("resuming %s at step %d (epoch %d)", run_dir, resumed["step"], resumed["epoch"] + 1)
    if dist.enabled:
        log.info("process %d of %d, device %s", dist.rank + 1, dist.world_size, device)
    torch.manual_seed(cfg.train.seed)
    if resumed is None:
        tokenizer = tokenizer_from_state(start["tokenizer"]) if start is not None else None
        task = None

        def learn() -> dict[str, Any]:
            nonlocal task
            task = build_task(cfg, tokenizer)
            save_checkpoint(run_dir / "tokenizer.pt", {"tokenizer": task.tokenizer.state_dict()})
            return task.tokenizer.state_dict()

        # Rank 0 fetches the corpus and learns the tokenizer; the other processes take its.
        learned = dist.on_main(learn)
        if task is None:
            task = build_task(cfg, tokenizer_from_state(learned))
    else:
        task = build_task(cfg, tokenizer_from_state(resumed["tokenizer"]))
    model = build_model(cfg.model, task.tokenizer).to(device)
    if start is not None or resumed is not None:
        freeze(model, cfg.finetune)  # before DDP, which expects a gradient for every trainable weight
    if dist.enabled:
        torch.manual_seed(cfg.train.seed + dist.rank)  # the same weights, but each its own dropout masks
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s parameters, device %s, amp %s", f"{n_params:,}", device, cfg.train.amp)
    metrics = MetricsLog(run_dir / "metrics.jsonl") if dist.is_main else None
    trainer = Trainer(model, cfg.train, task.tokenizer.pad_id, device, metrics, dist)
    validate = Validator(cfg, task, run_dir, metrics, device, dist)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        trainer.load_state_dict(resumed["trainer"])
        validate.load_state_dict(resumed["validator"])
    elif start is not None:
        model.load_state_dict(start["model"])
        if cfg.finetune.keep_optimizer:
            if "trainer" not in start:
                raise ConfigError(
                    f"'finetune.keep_optimizer': {cfg.finetune.init_from} holds no optimizer state (averaged?)"
                )
            trainer.optimizer.load_state_dict(start["trainer"]["optimizer"])
            trainer.scheduler.load_state_dict(start["trainer"]["scheduler"])
        validate(trainer)  # where fine-tuning starts from: step 0 in the metrics, and best.pt
    with stop_on_signals(trainer) as received:
        epochs = trainer.fit(task.train_batches, validate)
    if trainer.stop_requested:
        validate.save(trainer)
        log.info("stopped at step %d; saved %s. Continue with: python train.py --resume %s",
                 trainer.step, run_dir / "last.pt", run_dir)
        interrupted = received[0] if received else signal.SIGINT  # or another process's signal
        return RunResult(run_dir, epochs, [], interrupted=interrupted, main=dist.is_main)
    if validate.last_step != trainer.step:  # the run ended between two evaluation points
        validate(trainer)
    log.info("saved %s and %s", run_dir / "last.pt", run_dir / "best.pt")
    if not dist.is_main:  # the test set and the demo are rank 0's
        return RunResult(run_dir, epochs, [], main=False)

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
