"""Dropout with a cheaper random mask on the CPU.

``nn.Dropout`` on the CPU draws one Bernoulli sample per element from the Mersenne
Twister generator, and those draws are a large part of a training step. Here each
64-bit draw of the same generator gives four 16-bit numbers, and an element is kept
when its number is at or above ``p``'s threshold: a quarter of the draws. The drop probability is ``p`` rounded
to a multiple of 1/65536 (0.1 becomes 0.1000061), and kept elements are scaled by one
over the keep probability actually used, so the output's expectation is the input.

It draws from torch's default generator, like ``nn.Dropout``: ``torch.manual_seed``
and saved generator states make it reproducible (exact resume depends on that). On
other devices it is ``nn.Dropout`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 1 << 16  # the resolution of the drop probability


def cpu_dropout(x: Tensor, p: float) -> Tensor:
    """Zero each element of ``x`` with probability ``p`` (to 1/65536), scale the rest."""
    dropped = round(p * LEVELS)
    if dropped == 0:
        return x
    if dropped == LEVELS:
        return torch.zeros_like(x)
    n = x.numel()
    # Four uniform 16-bit numbers from each 64-bit draw (randint's upper bound is
    # exclusive, so one of the 2^64 patterns never comes: a bias of 2^-64).
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    numbers = words.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    keep = (numbers >= dropped - LEVELS // 2).to(x.dtype)  # 0 or 1, exact in any dtype
    # Multiplying by the mask is about twice as fast as torch.where, forward and
    # backward; the scale is a Python number, so bf16 inputs are scaled exactly
    # before their one rounding.
    return (x * keep).mul_(LEVELS / (LEVELS - dropped))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, same ``p``), with ``cpu_dropout`` on the CPU."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or self.inplace:
            return F.dropout(x, self.p, True, self.inplace)
        return cpu_dropout(x, self.p)
