"""Where a run is, when it ends, and the random state that makes it repeatable.

Three small pieces the ``Trainer`` is made of:

* ``TrainState``: the counters (step, epoch, position in the epoch's batches, time,
  the epoch's running loss);
* ``Stopping``: the policy that ends training (epochs, steps, minutes, a signal,
  validation's early stop), agreed on by every process when there are several;
* ``rng_state`` / ``set_rng_state``: the generators whose states a checkpoint holds,
  so that a resumed run draws the same dropout masks as it would have uninterrupted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from transformer.config import TrainConfig


@dataclass
class TrainState:
    """The counters of a run; with the generators' states, enough to continue it exactly.

    ``epoch_loss`` stays a tensor on the training device, so adding each step's loss
    never waits for the device.
    """

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    train_seconds: float = 0.0  # time spent in ``Trainer.fit``, for train.max_minutes
    epoch_loss: Tensor = field(default_factory=lambda: torch.zeros(()))  # summed over this process's tokens
    epoch_tokens: int = 0  # target tokens of the epoch so far, over all processes

    def add(self, batches: int, loss: Tensor, ntokens: int) -> None:
        """Count one optimizer step over ``batches`` micro-batches."""
        self.batch_in_epoch += batches
        self.epoch_loss += loss
        self.epoch_tokens += ntokens

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch, self.epoch_tokens = 0, 0
        self.epoch_loss = torch.zeros_like(self.epoch_loss)


class Stopping:
    """When training ends: ``train.epochs``, ``train.max_steps``, ``train.max_minutes``,
    a stop requested (by a signal: at the next step boundary), or early stopping.

    With several processes a signal or the clock may reach one before the others: such
    wishes count only once every process has agreed on them, at a step's all-reduce
    (``wishes`` goes into it, ``agree`` takes its sums), so all stop after the same step.
    """

    def __init__(self, cfg: TrainConfig, distributed: bool = False):
        self.cfg, self.distributed = cfg, distributed
        self.requested = False  # set (by a signal handler) to stop at the next step boundary
        self.early = False  # set when validation asks to stop
        self._agreed = self._time_up = False
        self._start: float | None = None

    def start(self, state: TrainState) -> None:
        """Start the clock, counting the time ``state`` has already spent training."""
        self._start = time.perf_counter() - state.train_seconds

    def elapsed(self, state: TrainState) -> float:
        """Bring ``state.train_seconds`` up to date and return it."""
        if self._start is not None:
            state.train_seconds = time.perf_counter() - self._start
        return state.train_seconds

    def over_time(self, state: TrainState) -> bool:
        """Whether this process has spent ``train.max_minutes`` training."""
        seconds = self.elapsed(state)
        return self.cfg.max_minutes is not None and seconds >= 60 * self.cfg.max_minutes

    def wishes(self, state: TrainState) -> list[float]:
        """This process's wishes to stop, to be summed over all processes."""
        return [float(self.requested), float(self.over_time(state))]

    def agree(self, requested: float, time_up: float) -> None:
        """Take the sums of every process's ``wishes``."""
        self._agreed, self._time_up = requested > 0, time_up > 0

    def done(self, state: TrainState) -> bool:
        if self.distributed:
            asked = self._agreed or self._time_up
        else:
            asked = self.requested or self.over_time(state)
        max_steps = self.cfg.max_steps
        return self.early or asked or state.epoch >= self.cfg.epochs or (max_steps is not None and state.step >= max_steps)


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """The states of the generators that training draws from (dropout masks)."""
    state = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], device)
