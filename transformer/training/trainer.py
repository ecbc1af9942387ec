"""The training loop: batches in, optimizer steps out, beside the article's ``run_epoch``.

The ``Trainer`` owns the loss, the optimizer, the schedule and the loop. It knows
nothing of the task, the run directory or the checkpoints: what happens around the
steps (the progress bar, the epoch log, validation and saving) is done by callbacks
(``transformer.training.callbacks``), and when to stop by ``Stopping``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor

from transformer.config import TrainConfig
from transformer.data.batching import Batch
from transformer.fast.output_loss import output_layer_loss
from transformer.model.architecture import EncoderDecoder
from transformer.runtime import autocast
from transformer.training.distributed import Distributed
from transformer.training.loss import LabelSmoothing
from transformer.training.precision import Bf16Copy
from transformer.training.schedule import cooldown, make_optimizer, make_scheduler
from transformer.training.state import Stopping, TrainState, rng_state, set_rng_state

log = logging.getLogger(__name__)


@dataclass
class EpochSummary:
    epoch: int  # 1-based
    step: int  # optimizer steps so far
    train_loss: float  # label-smoothed KL per target token
    lr: float
    tokens_per_s: float
    seconds: float
    complete: bool  # False: training stopped inside the epoch


class Callback:
    """What happens around the training steps; each method may be left as it is."""

    def on_epoch_start(self, trainer: "Trainer", steps: int | None) -> None:
        """Before the epoch's first step of this call; ``steps`` it has in all, if known."""

    def on_step(self, trainer: "Trainer", loss: Tensor, ntokens: int) -> None:
        """After every optimizer step, with its summed loss (a tensor: reading it waits for the device)."""

    def on_epoch_end(self, trainer: "Trainer", summary: EpochSummary) -> None:
        """After the epoch ends, or training stops inside it (``summary.complete``)."""


def chunks(items: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Group micro-batches for one optimizer step each (the last group may be smaller)."""
    it = iter(items)
    while group := list(islice(it, size)):
        yield group


class Trainer:
    """Optimise ``model`` with label smoothing, Adam and the Noam schedule.

    Args:
        model: the network.
        cfg: the training section of the config.
        pad_id: target padding id (ignored by the loss).
        device: where the batches go.
        dist: the training processes (default: this one alone). With several, each
            optimizer step takes ``accum_steps * world_size`` consecutive micro-batches
            of the epoch, ``accum_steps`` per process; gradients are averaged over all
            of their target tokens, so every process keeps the same weights, equal to
            those of one process accumulating the whole group. An incomplete group at
            an epoch's end is left out.
        callbacks: called around the steps, in this order.
    """

    def __init__(self, model: EncoderDecoder, cfg: TrainConfig, pad_id: int, device: torch.device,
                 dist: Distributed | None = None, callbacks: Sequence[Callback] = ()):
        self.model, self.cfg, self.device = model, cfg, device
        self.dist = dist if dist is not None else Distributed(device=device)
        # What training steps run on: the model, or its bf16 copy (train.amp bf16-weights,
        # transformer.training.precision) whose gradients go to the model's fp32 weights.
        self.bf16_copy = Bf16Copy(model) if cfg.amp == "bf16-weights" else None
        self.net = self.bf16_copy.copy if self.bf16_copy else model
        # DDP all-reduces the gradients; self.model stays the plain module (checkpoints
        # hold no "module." prefix). Training steps call self.forward.
        self.ddp = self.dist.wrap(self.net)
        if self.ddp is not None and self.bf16_copy:
            self.bf16_copy.reduce_in_float32(self.ddp)
        self.forward = _compiled(self.ddp or self.net, device) if cfg.compile else (self.ddp or self.net)
        self.criterion = LabelSmoothing(model.tgt_vocab, pad_id, cfg.label_smoothing)
        self.optimizer = make_optimizer(model, cfg)
        autocast(device, cfg.amp)  # fail now, not at the first step, on an impossible setting
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.state = TrainState(epoch_loss=torch.zeros((), device=device))
        self.stopping = Stopping(cfg, self.dist.enabled)
        self._train_seconds = 0.0  # the time progress counts (all processes agree on it)
        if cfg.cooldown and cfg.max_steps is None and cfg.max_minutes is None:
            log.warning("train.cooldown is %g, but the run has no train.max_steps or train.max_minutes to "
                        "count it from: the rate does not cool down", cfg.cooldown)
        self.scheduler = make_scheduler(self.optimizer, model.d_model, cfg.lr_factor, cfg.warmup,
                                        scale=lambda: cooldown(self.progress, cfg.cooldown))
        self.callbacks = list(callbacks)
        self._epoch_start = self._paused = 0.0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def progress(self) -> float:
        """How much of the run is done: steps of ``train.max_steps`` or training time of
        ``train.max_minutes``, whichever is further (0 when neither is set)."""
        cfg, done = self.cfg, 0.0
        if cfg.max_steps is not None:
            done = self.state.step / cfg.max_steps
        if cfg.max_minutes is not None:
            done = max(done, self._train_seconds / (60 * cfg.max_minutes))
        return done

    @property
    def group_size(self) -> int:
        """Micro-batches per optimizer step, over all processes."""
        return self.cfg.accum_steps * self.dist.world_size

    def loss(self, batch: Batch, train: bool = False, grad_scale: float | None = None) -> Tensor:
        """The summed label-smoothed loss of one batch (already on the device).

        Args:
            train: run the training forward pass (through DDP and ``torch.compile``
                when they are on).
            grad_scale: the loss's factor in what the backward pass differentiates:
                the output layer then makes its gradients in the forward pass
                (``transformer.fast.output_loss``).
        """
        net, model = (self.forward, self.net) if train else (self.model, self.model)
        amp = "none" if model is not self.model else self.cfg.amp  # the bf16 copy needs no autocast
        with autocast(self.device, amp):
            out = net(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask)  # (B, T, d_model)
            # Only real target positions go through the (large) output layer.
            real = batch.tgt_out != self.criterion.padding_idx
            return output_layer_loss(self.criterion, out[real], model.generator, batch.tgt_out[real],
                                     grad_scale=grad_scale)

    def accumulate(self, group: list[Batch], ntokens: int | None = None) -> tuple[Tensor, int]:
        """Forward and backward over a group of micro-batches, adding to the gradients.

        Each micro-batch's summed loss is divided by the target tokens of the whole
        group, so the accumulated gradient is the token average over the group: the
        same as one batch holding all of it.

        Args:
            group: this process's micro-batches of the step.
            ntokens: the step's target tokens over all processes (default: this
                group's). DDP averages the gradients over the processes, so each
                multiplies its loss by their number.

        Returns:
            This group's summed loss (a detached tensor: no device sync here) and ``ntokens``.
        """
        ntokens = sum(b.ntokens for b in group) if ntokens is None else ntokens
        total = torch.zeros((), device=self.device)
        if ntokens == 0:
            return total, 0
        if self.bf16_copy:
            self.bf16_copy.pull()
        # fp16's loss scale changes from step to step: its output layer's gradients wait
        # for the backward pass, so that they are made at that scale.
        factor = self.dist.world_size / ntokens
        grad_scale = None if self.scaler.is_enabled() else factor
        for i, batch in enumerate(group):
            # DDP all-reduces during the backward pass: only once, for the last micro-batch.
            last = i == len(group) - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                loss = self.loss(batch.to(self.device, non_blocking=True), train=True, grad_scale=grad_scale)
                self.scaler.scale(loss * factor).backward()
            if self.bf16_copy and self.ddp is not None and last:
                self.bf16_copy.drop_grads()  # the all-reduce put the sum in the fp32 weights'
            elif self.bf16_copy:
                self.bf16_copy.push_grads()  # summed in fp32 over the micro-batches
            total += loss.detach()
        return total, ntokens

    def optimizer_step(self) -> None:
        """Clip, update the weights, clear the gradients and advance the schedule."""
        if self.cfg.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        if not self.dist.enabled:
            self._train_seconds = self.stopping.elapsed(self.state)
        self.scheduler.step()  # once per optimizer step, not per micro-batch

    def train_step(self, group: list[Batch], ntokens: int | None = None) -> tuple[Tensor, int]:
        """One optimizer step over this process's micro-batches; returns (summed loss, tokens).

        Args:
            ntokens: the step's target tokens over all processes (see ``accumulate``).
        """
        loss, ntokens = self.accumulate(group, ntokens)
        if ntokens:
            self.optimizer_step()
        return loss, ntokens

    def _step(self, group: list[Batch]) -> tuple[Tensor, int]:
        """One step over ``group``, every process's micro-batches of it.

        With several processes one all-reduce before the step sums the step's target
        tokens and the processes' wishes to stop; those are acted on, by all together,
        after the step.
        """
        if not self.dist.enabled:
            return self.train_step(group)
        k = self.cfg.accum_steps
        mine = group[self.dist.rank * k:(self.dist.rank + 1) * k]
        ntokens, seconds, *wishes = self.dist.sum([sum(b.ntokens for b in mine), self.stopping.elapsed(self.state),
                                                   *self.stopping.wishes(self.state)])
        # Every process steps with the same learning rate: the mean of their clocks.
        self._train_seconds = seconds / self.dist.world_size
        loss, ntokens = self.train_step(mine, int(ntokens))
        self.stopping.agree(*wishes)
        return loss, ntokens

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> float:
        """Label-smoothed loss per target token over ``batches``, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        total, ntokens = torch.zeros((), device=self.device), 0
        for batch in batches:
            total += self.loss(batch.to(self.device))
            ntokens += batch.ntokens
        self.model.train(was_training)
        return total.item() / max(ntokens, 1)

    def run_epoch(self, batches: Iterable[Batch]) -> bool:
        """Train on ``batches`` (this epoch's from ``state.batch_in_epoch`` on), until they
        run out or training is to stop; returns whether the epoch is over."""
        self.model.train()
        size = self.group_size
        groups = chunks(batches, size)
        for group in groups:
            if self.dist.enabled and len(group) < size:  # no process may wait for a share the others lack
                log.info("epoch %d: %d batches left out (fewer than %d, one step's)",
                         self.state.epoch + 1, len(group), size)
                return True
            loss, ntokens = self._step(group)
            self.state.add(len(group), loss, ntokens)
            self._call("on_step", loss, ntokens)
            if self.stopping.done(self.state):
                # Over only if no step is left (one more group is built to find out).
                rest = next(groups, None)
                return rest is None or (self.dist.enabled and len(rest) < size)
        return True

    def fit(self, train_batches: Callable[[int, int], Iterable[Batch]]) -> list[EpochSummary]:
        """Train until ``Stopping`` says so.

        Args:
            train_batches: (epoch index (0-based), first batch) -> that epoch's batches
                from that one on (after a resume, the batches before it were trained on).
        """
        summaries = []
        self.stopping.start(self.state)
        while not self.stopping.done(self.state):
            batches = train_batches(self.state.epoch, self.state.batch_in_epoch)
            tokens_before = self.state.epoch_tokens
            self._epoch_start, self._paused = time.perf_counter(), 0.0
            self._call("on_epoch_start", self._steps_in(batches))
            complete = self.run_epoch(batches)
            seconds = self.epoch_seconds
            summary = EpochSummary(
                epoch=self.state.epoch + 1, step=self.state.step,
                train_loss=self.dist.sum([self.state.epoch_loss.item()])[0] / max(self.state.epoch_tokens, 1),
                lr=self.lr, tokens_per_s=(self.state.epoch_tokens - tokens_before) / max(seconds, 1e-9),
                seconds=seconds, complete=complete,
            )
            if complete:
                self.state.next_epoch()
            summaries.append(summary)
            self._call("on_epoch_end", summary)
        # A stop requested in one process after the last step's all-reduce: agree now,
        # so that every process ends the run the same way.
        self.stopping.requested = self.dist.any(self.stopping.requested)
        return summaries

    @property
    def epoch_seconds(self) -> float:
        """Time spent training in the current call of ``run_epoch``, callbacks left out."""
        return time.perf_counter() - self._epoch_start - self._paused

    def _call(self, hook: str, *args: Any) -> None:
        start = time.perf_counter()
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)
        self._paused += time.perf_counter() - start

    def _steps_in(self, batches: Iterable[Batch]) -> int | None:
        if not hasattr(batches, "__len__"):
            return None
        size, total = self.group_size, self.state.batch_in_epoch + len(batches)
        return total // size if self.dist.enabled else math.ceil(total / size)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where training is now (plain values and
        tensors): optimizer, schedule, loss scaler, counters, the generators' states.

        With several processes it is a collective (every process calls it): it gathers
        every process's generator states (``rng_ranks``, in rank order) and the epoch's
        loss summed over them.
        """
        s = self.state
        self.stopping.elapsed(s)
        rng = rng_state(self.device)
        state = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "step": s.step, "epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch,
            "train_seconds": s.train_seconds, "epoch_loss": self.dist.sum([s.epoch_loss.item()])[0],
            "epoch_tokens": s.epoch_tokens, **rng,
        }
        if self.dist.enabled:
            state["rng_ranks"] = self.dist.gather(rng)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s result (the model's weights are loaded apart)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        # Each process keeps its share of the epoch's loss; the sum is what was saved.
        loss = torch.tensor(state["epoch_loss"] if self.dist.is_main else 0.0, device=self.device)
        self.state = TrainState(state["step"], state["epoch"], state["batch_in_epoch"], state["train_seconds"], loss,
                                state["epoch_tokens"])
        self._train_seconds = state["train_seconds"]
        ranks = state.get("rng_ranks", [{key: state[key] for key in ("rng_cpu", "rng_cuda") if key in state}])
        if len(ranks) != self.dist.world_size and self.dist.enabled:
            # One saved state for several processes would give them all the same dropout
            # masks: keep each process's own seed instead.
            log.warning("resuming %d processes from a checkpoint of %d: dropout masks differ from the run's own",
                        self.dist.world_size, len(ranks))
            return
        set_rng_state(ranks[self.dist.rank] if len(ranks) == self.dist.world_size else ranks[0], self.device)


def _compiled(forward: Callable, device: torch.device) -> Callable:
    """``torch.compile`` with dynamic shapes: one compilation for every batch shape."""
    import torch._inductor.config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    # Dropout then draws from torch's generator as in eager mode, so a run is
    # reproducible from its seed and saved generator states (exact resume).
    inductor_config.fallback_random = True
    if device.type == "cpu" and str(pick_vec_isa()) == "avx2":
        # The AVX2 vector code torch 2.13's inductor writes (on a CPU without AVX-512, or
        # under ATEN_CPU_CAPABILITY=avx2) computes this model's forward pass wrong with
        # dynamic shapes (NaN and values of 1e13 where eager gives O(1)); its scalar code
        # computes it right. tests/test_train.py compares compiled training with eager.
        log.warning("train.compile: inductor's AVX2 vector code is wrong for this model; compiling scalar code")
        inductor_config.cpp.simdlen = 1
    return torch.compile(forward, dynamic=True)
