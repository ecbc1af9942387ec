"""Dropout with a cheaper random mask on the CPU.

``nn.Dropout`` on the CPU draws one Bernoulli sample per element from the Mersenne
Twister generator, and those draws are a large part of a training step. Here each
element takes a 16-bit number, four from each 64-bit output of numpy's SFC64 generator
(about three times the Mersenne Twister's speed here), and is kept when its number is at
or above ``p``'s threshold. The drop probability is ``p`` rounded to a multiple of
1/65536 (0.1 becomes 0.1000061), and kept elements are scaled by one over the keep
probability actually used, so the output's expectation is the input.

Each call seeds its SFC64 stream with one draw from torch's default generator, as
``nn.Dropout`` draws from it: ``torch.manual_seed`` and saved generator states make
the masks reproducible (exact resume depends on that), and numpy keeps a seeded
generator's stream the same across its versions. On other devices it is
``nn.Dropout`` itself.
"""

from __future__ import annotations

import numpy as np
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
    numbers = random_int16(x.numel()).view(x.shape)  # uniform on [-32768, 32767]
    # The comparison writes 0 or 1 straight into x's dtype (exact in any dtype): a bool
    # mask converted afterwards costs more than the comparison itself.
    keep = torch.ge(numbers, dropped - LEVELS // 2, out=torch.empty_like(x))
    # Multiplying by the mask is about twice as fast as torch.where, forward and
    # backward; the scale is a Python number, so bf16 inputs are scaled exactly
    # before their one rounding.
    return (x * keep).mul_(LEVELS / (LEVELS - dropped))


@torch.compiler.disable  # numpy's generator is opaque to torch.compile: run it eagerly
def random_int16(n: int) -> Tensor:
    """``n`` uniform 16-bit integers, four from each 64-bit output of a SFC64 stream
    whose seed is one draw from torch's default generator."""
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    words = np.random.SFC64(seed).random_raw((n + 3) // 4)
    return torch.from_numpy(words.view(np.int16)[:n])


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, same ``p``), with ``cpu_dropout`` on the CPU."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or self.inplace:
            return F.dropout(x, self.p, True, self.inplace)
        return cpu_dropout(x, self.p)
