"""Label-smoothed loss, as the Annotated Transformer defines it."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LabelSmoothing(nn.Module):
    """KL divergence to a smoothed target distribution, summed over tokens.

    The smoothed target for a token keeps 1 − ε on the true class, gives 0 to the
    padding class, and spreads ε evenly over the other V − 2 classes. Positions whose
    target is padding contribute nothing. This is the reference's definition.

    The reference builds that (N, V) distribution and calls ``nn.KLDivLoss``; here the
    same quantity is computed from three numbers per row (the log-probability of the
    target, of padding, and the sum over all classes), which gives the same value and
    gradients without materialising the distribution. ``smoothed_targets`` still
    builds it, for the tests and the figures.

    Training calls ``from_hidden`` instead, which fuses the output layer, the
    log-softmax and the loss, chunk by chunk, with a hand-written backward
    (softmax(z) − q).

    Args:
        size: vocabulary size V (at least 3).
        padding_idx: id of the padding token.
        smoothing: ε.

    Shape:
        x: log-probabilities (N, V); target (N,) -> scalar (the sum over tokens).
    """

    def __init__(self, size: int, padding_idx: int, smoothing: float = 0.0):
        super().__init__()
        if size < 3:
            raise ValueError(f"label smoothing needs a vocabulary of at least 3 classes, got {size}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.size = size
        self.padding_idx = padding_idx
        self.smoothing = smoothing
        self.confidence = 1.0 - smoothing
        self.other = smoothing / (size - 2)  # mass on each class that is neither target nor padding
        # Σ q log q of one smoothed row (0·log 0 = 0), so the result is the KL divergence
        # itself, not only equal to it up to a constant.
        self.entropy_term = sum(
            n * p * math.log(p) for n, p in ((1, self.confidence), (size - 2, self.other)) if p > 0
        )

    def smoothed_targets(self, target: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (N, V) target distribution of the reference (``true_dist``)."""
        dist = torch.full((target.size(0), self.size), self.other, dtype=dtype, device=target.device)
        dist.scatter_(1, target.unsqueeze(1), self.confidence)
        dist[:, self.padding_idx] = 0
        dist[target == self.padding_idx] = 0
        return dist

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # never sum in half precision
        keep = target != self.padding_idx
        lp_target = x.gather(1, target.unsqueeze(1)).squeeze(1)
        lp_pad = x[:, self.padding_idx]
        lp_other = x.sum(dim=1) - lp_target - lp_pad
        cross_entropy = -(self.confidence * lp_target + self.other * lp_other)
        return torch.where(keep, cross_entropy + self.entropy_term, 0.0).sum()

    def from_hidden(self, hidden: Tensor, proj: nn.Linear, target: Tensor, chunk: int = 512) -> Tensor:
        """The same loss from decoder states: ``forward(log_softmax(proj(hidden)), target)``.

        The output layer and the loss are computed together, ``chunk`` rows at a time,
        with a hand-written backward (the gradient with respect to the logits is
        softmax(z) − q). No (N, V) tensor is ever built: on the CPU such tensors are
        larger than what malloc recycles, and touching fresh pages for them every step
        cost more than the arithmetic.

        Shape:
            hidden (N, d_model), target (N,) -> scalar.
        """
        return _SmoothedOutputLoss.apply(hidden, proj.weight, proj.bias, target, self, chunk)


class _SmoothedOutputLoss(torch.autograd.Function):
    """Linear output layer + log-softmax + ``LabelSmoothing``, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, crit: LabelSmoothing, chunk: int) -> Tensor:
        dtype = hidden.dtype  # bf16 under autocast: the matmuls run in it, the softmax in float32
        acc = torch.promote_types(dtype, torch.float32)
        w, b = weight.to(dtype), bias.to(dtype)
        total = hidden.new_zeros((), dtype=acc)
        logits = []
        for start in range(0, hidden.size(0), chunk):
            z = torch.addmm(b, hidden[start : start + chunk], w.t())  # (chunk, V)
            logits.append(z)
            log_probs = torch.log_softmax(z.to(acc), dim=-1)
            total += crit.forward(log_probs, target[start : start + chunk])
        ctx.save_for_backward(hidden, weight, target, *logits)
        ctx.crit, ctx.chunk = crit, chunk
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        hidden, weight, target, *logits = ctx.saved_tensors
        crit, chunk = ctx.crit, ctx.chunk
        dtype = hidden.dtype
        acc = torch.promote_types(dtype, torch.float32)
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=acc)
        grad_bias = torch.zeros(weight.size(0), dtype=acc, device=weight.device)
        for i, z in enumerate(logits):
            rows = slice(i * chunk, i * chunk + z.size(0))
            t = target[rows]
            grad = torch.softmax(z.to(acc), dim=-1)
            # softmax − q: q is `other` everywhere but the target (confidence) and padding (0).
            grad.sub_(crit.other)
            grad.scatter_add_(1, t.unsqueeze(1), grad.new_full((grad.size(0), 1), crit.other - crit.confidence))
            grad[:, crit.padding_idx] += crit.other
            grad.mul_(((t != crit.padding_idx).to(grad.dtype) * grad_output).unsqueeze(1))
            grad_bias += grad.sum(0)
            grad = grad.to(dtype)
            grad_hidden[rows] = grad @ w
            grad_weight += grad.t() @ hidden[rows]
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None, None, None
