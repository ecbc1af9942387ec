"""A training run from a config: its folder, its task, model and trainer, its ending.

A run starts three ways: fresh from a config, from a trained checkpoint (fine-tuning,
``--init-from``), or where an interrupted run left off (``--resume``). ``_begin``
gathers what each way starts from; the rest is the same for all three.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transformer.config import Config, ConfigError, FinetuneConfig, load_config, save_config, to_dict
from transformer.data.tokenizers import tokenizer_from_state
from transformer.model.architecture import EncoderDecoder
from transformer.runtime import LOG_FORMAT, setup_logging
from transformer.tasks import Task, build_task
from transformer.training.callbacks import EpochLog, MetricsLog, ProgressBar, Validator
from transformer.training.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from transformer.training.distributed import Distributed, distributed
from transformer.training.trainer import EpochSummary, Trainer

log = logging.getLogger(__name__)


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

    Launched by ``torchrun`` (see ``transformer.training.distributed``), each process trains on
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
        trainer.stopping.requested = True
        # The handler runs between two bytecodes of whatever the main thread was doing,
        # perhaps inside a logging handler's write or flush: logging from here would re-enter
        # that stream ("reentrant call inside BufferedWriter"). The line is formatted as a
        # log line and written unbuffered to stderr's descriptor, which shares no state with
        # any stream; train.log names the signal at the stop.
        notice = log.makeRecord(
            log.name, logging.WARNING, __file__, 0,
            "%s: stopping after this step, with a checkpoint; press Ctrl-C again to stop at once",
            (signal.Signals(signum).name,), None,
        )
        with suppress(OSError):
            os.write(2, (LOG_FORMAT.format(notice) + "\n").encode())
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


@dataclass
class _Start:
    """What a run starts from: a checkpoint to resume or fine-tune from (or none), and
    the tokenizer's state when it is not to be learned."""

    resumed: dict[str, Any] | None = None
    init: dict[str, Any] | None = None

    @property
    def tokenizer(self) -> dict[str, Any] | None:
        state = self.resumed or self.init
        return state["tokenizer"] if state is not None else None


def _begin(cfg: Config, run_dir: Path, resumed: dict[str, Any] | None, dist: Distributed) -> _Start:
    if resumed is not None:
        log.info("resuming %s at step %d (epoch %d)", run_dir, resumed["step"], resumed["epoch"] + 1)
        return _Start(resumed=resumed)
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
    log.info("run directory: %s", run_dir)
    if cfg.finetune.init_from is None:
        return _Start()
    init = load_checkpoint(cfg.finetune.init_from)
    log.info("starting from %s (step %s)", cfg.finetune.init_from, init.get("step"))
    return _Start(init=init)


def _task(cfg: Config, run_dir: Path, start: _Start, dist: Distributed) -> Task:
    """The task, with the tokenizer of the checkpoint started from, else one learned by
    rank 0 (which also fetches the corpus) and given to the other processes."""
    if start.resumed is not None:
        return build_task(cfg, tokenizer_from_state(start.tokenizer))
    task = None

    def learn() -> dict[str, Any]:
        nonlocal task
        task = build_task(cfg, tokenizer_from_state(start.tokenizer) if start.tokenizer is not None else None)
        save_checkpoint(run_dir / "tokenizer.pt", {"tokenizer": task.tokenizer.state_dict()})
        return task.tokenizer.state_dict()

    learned = dist.on_main(learn)
    return task if task is not None else build_task(cfg, tokenizer_from_state(learned))


def _restore(cfg: Config, model: EncoderDecoder, trainer: Trainer, validator: Validator, start: _Start) -> None:
    """Load what the run starts from into the model, the trainer and the validator."""
    if start.resumed is not None:
        model.load_state_dict(start.resumed["model"])
        trainer.load_state_dict(start.resumed["trainer"])
        validator.load_state_dict(start.resumed["validator"])
    elif start.init is not None:
        model.load_state_dict(start.init["model"])
        if cfg.finetune.keep_optimizer:
            if "trainer" not in start.init:
                raise ConfigError(
                    f"'finetune.keep_optimizer': {cfg.finetune.init_from} holds no optimizer state (averaged?)"
                )
            trainer.optimizer.load_state_dict(start.init["trainer"]["optimizer"])
            trainer.scheduler.load_state_dict(start.init["trainer"]["scheduler"])
        validator(trainer)  # where fine-tuning starts from: step 0 in the metrics, and best.pt


def _run(
    cfg: Config, run_dir: Path, demo_sentences: int, resumed: dict[str, Any] | None, dist: Distributed
) -> RunResult:
    device = dist.device
    start = _begin(cfg, run_dir, resumed, dist)
    if dist.enabled:
        log.info("process %d of %d, device %s", dist.rank + 1, dist.world_size, device)
    torch.manual_seed(cfg.train.seed)
    task = _task(cfg, run_dir, start, dist)
    model = build_model(cfg.model, task.tokenizer).to(device)
    if start.init is not None or start.resumed is not None:
        freeze(model, cfg.finetune)  # before DDP, which expects a gradient for every trainable weight
    if dist.enabled:
        torch.manual_seed(cfg.train.seed + dist.rank)  # the same weights, but each its own dropout masks
    log.info("model: %s parameters, device %s, amp %s", f"{sum(p.numel() for p in model.parameters()):,}", device,
             cfg.train.amp)
    metrics = MetricsLog(run_dir / "metrics.jsonl") if dist.is_main else None
    validator = Validator(cfg, task, run_dir, metrics, device, dist)
    trainer = Trainer(model, cfg.train, task.tokenizer.pad_id, device, dist,
                      callbacks=[ProgressBar(), EpochLog(metrics), validator])
    _restore(cfg, model, trainer, validator, start)
    with stop_on_signals(trainer) as received:
        epochs = trainer.fit(task.train_batches)
    if trainer.stopping.requested:
        validator.save(trainer)
        interrupted = received[0] if received else signal.SIGINT  # or another process's signal
        log.info("%s: stopped at step %d; saved %s. Continue with: python train.py --resume %s",
                 signal.Signals(interrupted).name if received else "another process's signal",
                 trainer.state.step, run_dir / "last.pt", run_dir)
        return RunResult(run_dir, epochs, [], interrupted=interrupted, main=dist.is_main)
    if validator.last_step != trainer.state.step:  # the run ended between two evaluation points
        validator(trainer)
    log.info("saved %s and %s", run_dir / "last.pt", run_dir / "best.pt")
    if not dist.is_main:  # the test set and the demo are rank 0's
        return RunResult(run_dir, epochs, [], main=False)
    return RunResult(run_dir, epochs, task.finish(model, run_dir, metrics, demo_sentences))
