"""Label-smoothed loss, as the Annotated Transformer defines it."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LabelSmoothing(nn.Module):
    """KL divergence to a smoothed target distribution, summed over tokens.

    The smoothed target for a token keeps 1 − ε on the true class, gives 0 to the
    padding class, and spreads ε evenly over the other V − 2 classes; positions whose
    target is padding contribute nothing. This is the reference's definition, computed
    from three numbers per row (the log-probability of the target, of padding, and the
    sum over all classes) instead of the (N, V) distribution, which
    ``smoothed_targets`` still builds. Training fuses this loss with the output layer
    (``transformer.fast.output_loss``).

    Args:
        size: vocabulary size V (at least 3).
        padding_idx: id of the padding token.
        smoothing: ε.

    Shape:
        x: log-probabilities (N, V); target (N,) -> scalar (the sum over tokens).
    """

    def __init__(self, size: int, padding_idx: int, smoothing: float = 0.0):
        super().__init__()
        if size < 3 or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing needs size >= 3 and smoothing in [0, 1), got {size} and {smoothing}")
        self.size, self.padding_idx, self.smoothing = size, padding_idx, smoothing
        self.confidence = 1.0 - smoothing
        self.other = smoothing / (size - 2)  # mass on each class that is neither target nor padding
        # Σ q log q of a smoothed row (0·log 0 = 0): the loss is then the KL divergence itself.
        self.entropy_term = sum(n * p * math.log(p) for n, p in ((1, self.confidence), (size - 2, self.other)) if p > 0)

    def smoothed_targets(self, target: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (N, V) target distribution of the reference (``true_dist``)."""
        dist = torch.full((target.size(0), self.size), self.other, dtype=dtype, device=target.device)
        dist.scatter_(1, target.unsqueeze(1), self.confidence)
        dist[:, self.padding_idx] = 0
        dist[target == self.padding_idx] = 0
        return dist

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # never sum in half precision
        lp_target = x.gather(1, target.unsqueeze(1)).squeeze(1)
        lp_other = x.sum(dim=1) - lp_target - x[:, self.padding_idx]
        return self.from_sums(lp_target, lp_other, target)

    def from_sums(self, lp_target: Tensor, lp_other: Tensor, target: Tensor) -> Tensor:
        """The loss from each row's log-probability of the target and sum of the others'
        (padding's left out), each of shape (N,)."""
        cross_entropy = -(self.confidence * lp_target + self.other * lp_other)
        return torch.where(target != self.padding_idx, cross_entropy + self.entropy_term, 0.0).sum()
