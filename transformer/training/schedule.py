"""The optimizer and the learning-rate schedule of "Attention Is All You Need" (the "Noam"
schedule), with an optional cooldown to zero at the end of a run of known length."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from transformer.config import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with the paper's betas and epsilon (from ``cfg``), and base lr 1: the
    schedule's ``rate`` is the actual learning rate. The fused update is one kernel
    over all parameters."""
    return torch.optim.Adam(model.parameters(), lr=1.0, betas=cfg.adam_betas, eps=cfg.adam_eps,
                            weight_decay=cfg.weight_decay, fused=True)


def rate(step: int, model_size: int, factor: float, warmup: int) -> float:
    """lrate = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5).

    It grows linearly for ``warmup`` steps, peaks at step = warmup with
    factor · (d_model · warmup)^-0.5, then decays as 1/√step. Step 0 counts as 1, to
    avoid raising zero to a negative power.
    """
    step = max(step, 1)
    return factor * model_size ** (-0.5) * min(step ** (-0.5), step * warmup ** (-1.5))


def cooldown(progress: float, fraction: float) -> float:
    """The factor of the learning rate when ``progress`` (0 to 1) of the run is done: 1,
    then falling linearly to 0 over the last ``fraction`` of the run (1 throughout when
    ``fraction`` is 0).

    A rate that reaches zero as the budget ends does better than one cut off while still
    high, for the same number of steps (Li et al., 2020, "Budgeted Training").
    """
    if fraction <= 0:
        return 1.0
    return min(1.0, max(0.0, (1.0 - progress) / fraction))


def make_scheduler(optimizer: Optimizer, model_size: int, factor: float, warmup: int,
                   scale: Callable[[], float] = lambda: 1.0) -> LambdaLR:
    """A ``LambdaLR`` that sets the learning rate to ``rate(step) * scale()`` (the
    optimizer's base lr should be 1). Call its ``step()`` once per optimizer step, not per
    micro-batch."""
    return LambdaLR(optimizer, lr_lambda=lambda step: rate(step, model_size, factor, warmup) * scale())
