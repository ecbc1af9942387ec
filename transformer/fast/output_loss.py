"""Training's output layer, log-softmax and label-smoothed loss, fused chunk by chunk.

``LabelSmoothing(log_softmax(generator.proj(hidden)), target)`` builds two (N, V)
tensors and keeps them for the backward pass. Here the logits are made ``chunk`` rows
at a time and the gradient with respect to them is written by hand (softmax(z) − q,
q the smoothed target), so no (N, V) log-probability tensor is ever built: on the CPU
such tensors are larger than what malloc recycles, and touching fresh pages for them
every step cost more than the arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer.model.architecture import Generator
from transformer.training.loss import LabelSmoothing


def output_layer_loss(crit: LabelSmoothing, hidden: Tensor, generator: Generator, target: Tensor,
                      chunk: int = 512) -> Tensor:
    """``crit(generator(hidden), target)``, the same value and gradients, computed in chunks.

    Shape:
        hidden (N, d_model), target (N,) -> scalar.
    """
    proj = generator.proj
    return _SmoothedOutputLoss.apply(hidden, proj.weight, proj.bias, target, crit, chunk)


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
