"""The learning-rate schedule of "Attention Is All You Need" (the "Noam" schedule)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def rate(step: int, model_size: int, factor: float, warmup: int) -> float:
    """lrate = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5).

    It grows linearly for ``warmup`` steps, peaks at step = warmup with
    factor · (d_model · warmup)^-0.5, then decays as 1/√step. Step 0 counts as 1, to
    avoid raising zero to a negative power.
    """
    step = max(step, 1)
    return factor * model_size ** (-0.5) * min(step ** (-0.5), step * warmup ** (-1.5))


def make_scheduler(optimizer: Optimizer, model_size: int, factor: float, warmup: int) -> LambdaLR:
    """A ``LambdaLR`` that sets the learning rate to ``rate(step)`` (the optimizer's base lr
    should be 1). Call its ``step()`` once per optimizer step, not per micro-batch."""
    return LambdaLR(optimizer, lr_lambda=lambda step: rate(step, model_size, factor, warmup))
