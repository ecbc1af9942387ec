"""The training loop: small enough to read in one sitting, and ignorant of the task.

It is given a model, a way to get each epoch's batches and the validation batches,
and a ``TrainConfig``; it owns the loss, the optimizer and the schedule.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from transformer.batching import Batch
from transformer.config import TrainConfig
from transformer.distributed import Distributed
from transformer.loss import LabelSmoothing
from transformer.model import EncoderDecoder
from transformer.schedule import make_scheduler
from transformer.utils import MetricsLog, autocast

log = logging.getLogger(__name__)


def chunks(items: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Group micro-batches for one optimizer step each (the last group may be smaller)."""
    it = iter(items)
    while group := list(islice(it, size)):
        yield group


@dataclass
class EpochSummary:
    epoch: int  # 1-based
    step: int  # optimizer steps so far
    train_loss: float  # label-smoothed KL per target token
    lr: float
    tokens_per_s: float
    seconds: float


Validate = Callable[["Trainer"], bool]
"""Called at every evaluation point; evaluates, saves, and returns True to stop training."""


class Trainer:
    """Optimise ``model`` with label smoothing, Adam and the Noam schedule.

    Args:
        model: the network; its generator gives log-probabilities.
        cfg: the training section of the config.
        pad_id: target padding id (ignored by the loss).
        device: where the batches go.
        metrics: optional JSON-lines log of per-epoch figures.
        dist: the training processes (default: this one alone). With several, each
            optimizer step takes ``accum_steps * world_size`` consecutive micro-batches
            of the epoch, ``accum_steps`` per process; gradients are averaged over all
            of their target tokens, so every process keeps the same weights, equal to
            those of one process accumulating the whole group. An incomplete group at
            an epoch's end is left out. Decisions to stop are taken together.
    """

    def __init__(
        self,
        model: EncoderDecoder,
        cfg: TrainConfig,
        pad_id: int,
        device: torch.device,
        metrics: MetricsLog | None = None,
        dist: Distributed | None = None,
    ):
        self.model = model
        self.dist = dist if dist is not None else Distributed(device=device)
        # The model runs its forward pass through DDP, which all-reduces the gradients;
        # self.model stays the plain module (checkpoints hold no "module." prefix).
        # Buffers are constants (positional table): no broadcast at every forward.
        self.ddp = (
            DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False
            )
            if self.dist.enabled else None
        )
        # What training steps call: DDP or the plain model, compiled if asked for.
        self.forward = self.ddp if self.ddp is not None else model
        if cfg.compile:
            import torch._inductor.config as inductor_config

            # Dropout then draws from torch's generator as in eager mode, so a run is
            # reproducible from its seed and saved generator states (exact resume).
            inductor_config.fallback_random = True
            self.forward = torch.compile(self.forward, dynamic=True)
        self.cfg = cfg
        self.device = device
        self.metrics = metrics
        self.vocab_size = model.generator.proj.out_features
        self.criterion = LabelSmoothing(self.vocab_size, pad_id, cfg.label_smoothing)
        # Base lr 1: the scheduler's factor sets the actual rate. The fused update is one
        # kernel over all parameters: 4 ms a step instead of 17 for the default model on
        # the CPU.
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=1.0, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
            fused=True,
        )
        d_model = model.src_embed[0].d_model
        self.scheduler = make_scheduler(self.optimizer, d_model, cfg.lr_factor, cfg.warmup)
        autocast(device, cfg.amp)  # fail now, not at the first step, on an impossible setting
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # micro-batches of the current epoch already trained on
        self.stopped = False  # set when validation asks to stop early
        self.stop_requested = False  # set (e.g. by a signal) to stop at the next step boundary
        # With several processes, what all have agreed on at the last step's all-reduce:
        # a stop was requested in one of them; one has spent train.max_minutes.
        self._stop_agreed = self._time_up = False
        self.train_seconds = 0.0  # time spent in fit(), for train.max_minutes
        self._fit_start: float | None = None
        # The current epoch's loss and tokens so far (kept across a resume).
        self._epoch_loss, self._epoch_tokens = torch.zeros((), device=device), 0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _over_time(self) -> bool:
        """Whether this process has spent ``train.max_minutes`` training."""
        max_minutes = self.cfg.max_minutes
        if self._fit_start is not None:
            self.train_seconds = time.perf_counter() - self._fit_start
        return max_minutes is not None and self.train_seconds >= 60 * max_minutes

    @property
    def done(self) -> bool:
        max_steps = self.cfg.max_steps
        # With several processes, a signal or the clock may reach one before the others:
        # their wishes only count once all have agreed on them (at each step's all-reduce).
        return (
            self.stopped
            or ((self._stop_agreed or self._time_up) if self.dist.enabled else (self.stop_requested or self._over_time()))
            or self.epoch >= self.cfg.epochs
            or (max_steps is not None and self.step >= max_steps)
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where training is now (plain values and
        tensors): optimizer, schedule, loss scaler, counters, position in the epoch's
        batch order, the random number generators' states.

        With several processes it is a collective (every process calls it): it gathers
        every process's generator states (``rng_ranks``, in rank order) and the epoch's
        loss summed over them.
        """
        if self._fit_start is not None:
            self.train_seconds = time.perf_counter() - self._fit_start
        rng = self._rng_state()
        epoch_loss = self.dist.sum([self._epoch_loss.item()])[0]
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "train_seconds": self.train_seconds,
            "epoch_loss": epoch_loss,
            "epoch_tokens": self._epoch_tokens,
            **rng,
        }
        if self.dist.enabled:
            state["rng_ranks"] = self.dist.gather(rng)
        return state

    def _rng_state(self) -> dict[str, Tensor]:
        state = {"rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s result (the model's weights are loaded apart)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.train_seconds = state["train_seconds"]
        # Each process keeps its share of the epoch's loss; the sum is what was saved.
        self._epoch_loss = torch.tensor(state["epoch_loss"] if self.dist.is_main else 0.0, device=self.device)
        self._epoch_tokens = state["epoch_tokens"]
        ranks = state.get("rng_ranks", [{key: state[key] for key in ("rng_cpu", "rng_cuda") if key in state}])
        if len(ranks) != self.dist.world_size and self.dist.enabled:
            # One saved state for several processes would give them all the same dropout
            # masks: keep each process's own seed instead.
            log.warning(
                "resuming %d processes from a checkpoint of %d: dropout masks differ from the run's own",
                self.dist.world_size, len(ranks),
            )
            return
        rng = ranks[self.dist.rank] if len(ranks) == self.dist.world_size else ranks[0]
        torch.set_rng_state(rng["rng_cpu"])
        if "rng_cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["rng_cuda"], self.device)

    def loss(self, batch: Batch, train: bool = False) -> Tensor:
        """The summed label-smoothed loss of one batch (already on the device).

        Args:
            train: run the training forward pass: through DDP when there are several
                processes (the backward pass then all-reduces the gradients), compiled
                with ``train.compile``.
        """
        net = self.forward if train else self.model
        with autocast(self.device, self.cfg.amp):
            out = net(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask)  # (B, T, d_model)
            # Only real target positions go through the (large) output layer.
            real = batch.tgt_out != self.criterion.padding_idx
            return self.criterion.from_hidden(out[real], self.model.generator.proj, batch.tgt_out[real])

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
            This group's summed loss (a detached tensor: no device sync here) and
            ``ntokens``.
        """
        ntokens = sum(b.ntokens for b in group) if ntokens is None else ntokens
        total = torch.zeros((), device=self.device)
        if ntokens == 0:
            return total, 0
        for i, batch in enumerate(group):
            # DDP all-reduces during the backward pass: only once, for the last micro-batch.
            last = i == len(group) - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                loss = self.loss(batch.to(self.device, non_blocking=True), train=True)
                self.scaler.scale(loss * self.dist.world_size / ntokens).backward()
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
        self.scheduler.step()  # once per optimizer step, not per micro-batch
        self.step += 1

    def train_step(self, group: list[Batch], ntokens: int | None = None) -> tuple[Tensor, int]:
        """One optimizer step over a group of micro-batches; returns (summed loss, tokens).

        Args:
            ntokens: the step's target tokens over all processes (see ``accumulate``).
        """
        loss, ntokens = self.accumulate(group, ntokens)
        if ntokens:
            self.optimizer_step()
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

    def train_epoch(self, batches: Iterable[Batch], validate: Validate | None = None) -> tuple[bool, float]:
        """Run the rest of the current epoch (or until max_steps, a stop request, or
        ``validate`` says stop), starting at micro-batch ``batch_in_epoch``.

        With ``cfg.eval_every``, ``validate`` runs every that many optimizer steps.

        Returns:
            Whether the epoch's batches ran out, and the seconds spent training (not
            validating) in this call.
        """
        self.model.train()
        size = self.cfg.accum_steps * self.dist.world_size  # micro-batches per optimizer step
        n_batches = len(batches) if hasattr(batches, "__len__") else None
        steps = None
        if n_batches is not None:
            steps = n_batches // size if self.dist.enabled else math.ceil(n_batches / size)
        bar = tqdm(
            total=steps, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", unit="step",
            disable=None if self.dist.is_main else True, leave=False,
        )
        bar.update(self.batch_in_epoch // size)
        start = time.perf_counter()
        window_loss, window_tokens, window_start = torch.zeros((), device=self.device), 0, start
        groups = chunks(islice(batches, self.batch_in_epoch, None), size)
        for group in groups:
            if self.dist.enabled:
                if len(group) < size:  # no process may wait for a share the others lack
                    log.info("epoch %d: %d batches left out (fewer than %d, one step's)", self.epoch + 1, len(group), size)
                    break
                loss, ntokens = self._distributed_step(group)
            else:
                loss, ntokens = self.train_step(group)
            self.batch_in_epoch += len(group)
            self._epoch_loss += loss
            window_loss += loss
            self._epoch_tokens += ntokens
            window_tokens += ntokens
            bar.update(1)
            if self.step % self.cfg.log_every == 0:  # the only host sync in the loop
                now = time.perf_counter()
                bar.set_postfix(
                    loss=f"{self.dist.sum([window_loss.item()])[0] / max(window_tokens, 1):.3f}",
                    lr=f"{self.lr:.2e}",
                    tok_s=f"{window_tokens / (now - window_start):.0f}",
                )
                window_loss, window_tokens, window_start = torch.zeros((), device=self.device), 0, now
            if validate is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                paused = time.perf_counter()
                self.stopped = validate(self)
                self.model.train()
                validating = time.perf_counter() - paused
                start += validating  # the epoch's time and throughput count training only
                window_start += validating
            if self.done:
                break
        else:
            bar.close()
            return True, time.perf_counter() - start
        bar.close()
        # Stopped inside the epoch: it is over only if no step is left (one more group is
        # built to find out; a resumed run rebuilds the epoch from its seed anyway).
        rest = next(groups, None)
        return rest is None or (self.dist.enabled and len(rest) < size), time.perf_counter() - start

    def _distributed_step(self, group: list[Batch]) -> tuple[Tensor, int]:
        """This process's share of one step over ``group`` (all processes' micro-batches).

        One all-reduce before the step sums the step's target tokens and each process's
        wish to stop (a signal, the time budget); a wish is acted on, by all together,
        at the end of the step.
        """
        r, k = self.dist.rank, self.cfg.accum_steps
        mine = group[r * k:(r + 1) * k]
        ntokens, stop, time_up = self.dist.sum(
            [sum(b.ntokens for b in mine), float(self.stop_requested), float(self._over_time())]
        )
        loss, ntokens = self.train_step(mine, int(ntokens))
        self._stop_agreed, self._time_up = stop > 0, time_up > 0
        return loss, ntokens

    def fit(
        self,
        train_batches: Callable[[int], Iterable[Batch]],
        validate: Validate | None = None,
    ) -> list[EpochSummary]:
        """Train until ``cfg.epochs`` epochs, ``cfg.max_steps`` steps, or an early stop.

        Args:
            train_batches: epoch index (0-based) -> that epoch's batches.
            validate: called every ``cfg.eval_every`` steps, or after every epoch when
                that is None; returns True to stop.
        """
        summaries = []
        self._fit_start = time.perf_counter() - self.train_seconds
        while not self.done:
            tokens_before = self._epoch_tokens
            complete, seconds = self.train_epoch(train_batches(self.epoch), validate)
            summary = EpochSummary(
                epoch=self.epoch + 1,
                step=self.step,
                train_loss=self.dist.sum([self._epoch_loss.item()])[0] / max(self._epoch_tokens, 1),
                lr=self.lr,
                tokens_per_s=(self._epoch_tokens - tokens_before) / max(seconds, 1e-9),
                seconds=seconds,
            )
            if complete:
                self.epoch += 1
                self.batch_in_epoch = 0
                self._epoch_loss, self._epoch_tokens = torch.zeros((), device=self.device), 0
            summaries.append(summary)
            log.info(
                "epoch %d%s: step %d, train loss %.4f, lr %.2e, %.0f target tokens/s, %.1f s",
                summary.epoch, "" if complete else " (stopped inside it)", summary.step, summary.train_loss,
                summary.lr, summary.tokens_per_s, seconds,
            )
            if self.metrics is not None:
                self.metrics.write(kind="epoch", **summary.__dict__)
            if complete and validate is not None and not self.cfg.eval_every and not self.done:
                self.stopped = validate(self)
        # A signal that reached one process after the last step's all-reduce: agree now,
        # so that every process ends the run the same way.
        self.stop_requested = self.dist.any(self.stop_requested)
        return summaries
