"""Training's output layer, softmax and label-smoothed loss, fused chunk by chunk.

``LabelSmoothing(log_softmax(generator.proj(hidden)), target)`` builds two (N, V)
tensors and keeps them for the backward pass. Here the logits are made ``chunk`` rows
at a time and the gradient with respect to them is written by hand (softmax(z) − q,
q the smoothed target), so no (N, V) float32 tensor is ever built: on the CPU such
tensors are larger than what malloc recycles, and touching fresh pages for them every
step cost more than the arithmetic.

Each chunk takes one softmax, whose exponentials (the costly part of the elementwise
work) serve both the loss, through the log-sum-exp, and the gradient. When the caller
gives ``grad_scale``, the factor the backward pass will bring (1 / tokens in training),
the gradients are made in the forward pass from that softmax, no logits are kept, and
the backward pass only hands the gradients on: training's parameters come out the same
to the bit as with the softmax taken again in the backward pass, which is what happens
without ``grad_scale`` (the forward pass then keeps the chunks' logits).
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer.model.architecture import Generator
from transformer.training.loss import LabelSmoothing


def output_layer_loss(crit: LabelSmoothing, hidden: Tensor, generator: Generator, target: Tensor,
                      chunk: int = 512, grad_scale: float | None = None) -> Tensor:
    """``crit(generator(hidden), target)``, the same value and gradients, computed in chunks.

    Args:
        grad_scale: the gradient the backward pass will bring to the loss, if known
            (the loss's factor in the quantity differentiated). Any other gradient still
            gives the right result, by a rescaling of the gradients made in advance (in
            bf16 that adds one rounding, unless the ratio is a power of two).

    Shape:
        hidden (N, d_model), target (N,) -> scalar.
    """
    proj = generator.proj
    if not torch.is_grad_enabled():  # no backward pass will come (validation)
        grad_scale = None
    return _SmoothedOutputLoss.apply(hidden, proj.weight, proj.bias, target, crit, chunk, grad_scale)


class _SmoothedOutputLoss(torch.autograd.Function):
    """Linear output layer + softmax + ``LabelSmoothing``, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, crit: LabelSmoothing, chunk: int, grad_scale: float | None):
        dtype = hidden.dtype  # bf16 in bf16 training: the products run in it, the softmax in float32
        acc = torch.promote_types(dtype, torch.float32)
        w, b = weight.to(dtype), bias.to(dtype)
        total = hidden.new_zeros((), dtype=acc)
        ahead = grad_scale is not None and any(ctx.needs_input_grad[:3])
        if ahead:
            grads = _Gradients(hidden, weight)
            # The scale as the backward pass will see it, a float32 number.
            ctx.grad_scale = torch.tensor(grad_scale, dtype=acc, device=hidden.device)
        logits = []
        for start in range(0, hidden.size(0), chunk):
            rows = slice(start, start + chunk)
            z = torch.addmm(b, hidden[rows], w.t())  # (chunk, V)
            probs, loss = _softmax_and_loss(crit, z, target[rows])
            total += loss
            if ahead:
                # Products in ``hidden``'s dtype, as the backward pass (outside autocast) does.
                with torch.autocast(hidden.device.type, enabled=False):
                    grads.add(rows, probs, crit, target[rows], ctx.grad_scale, hidden, w)
            else:
                logits.append(z)
        if ahead:
            ctx.save_for_backward(*grads.result())
        else:
            ctx.save_for_backward(hidden, weight, target, *logits)
        ctx.ahead, ctx.crit, ctx.chunk = ahead, crit, chunk
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.ahead:
            ratio = grad_output / ctx.grad_scale  # exactly 1 when the scale was right
            return *(g * ratio.to(g.dtype) for g in ctx.saved_tensors), None, None, None, None
        hidden, weight, target, *logits = ctx.saved_tensors
        grads = _Gradients(hidden, weight)
        w = weight.to(hidden.dtype)
        for i, z in enumerate(logits):
            rows = slice(i * ctx.chunk, i * ctx.chunk + z.size(0))
            probs = torch.softmax(z.to(grads.acc), dim=-1)
            grads.add(rows, probs, ctx.crit, target[rows], grad_output, hidden, w)
        return *grads.result(), None, None, None, None


def _softmax_and_loss(crit: LabelSmoothing, z: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The softmax of logits ``z`` (float32 at least) and ``crit``'s summed loss, from it.

    With log p = z − lse, the loss needs per row only the log-sum-exp, the target's and
    padding's logits and the sum of all logits. The log-sum-exp comes from the softmax
    itself: the row's largest logit m has p = exp(m − lse) ≥ 1/V, so lse = m − log p
    there, exact to float32 rounding, with no second pass of exponentials.
    """
    zf = z.to(torch.promote_types(z.dtype, torch.float32))
    probs = torch.softmax(zf, dim=-1)
    top = zf.amax(dim=1)
    lse = top - probs.amax(dim=1).log()
    z_target = zf.gather(1, target.unsqueeze(1)).squeeze(1)
    z_others = zf.sum(dim=1) - z_target - zf[:, crit.padding_idx]
    return probs, crit.from_sums(z_target - lse, z_others - (crit.size - 2) * lse, target)


class _Gradients:
    """The gradients of the states, the weight and the bias, added up chunk by chunk."""

    def __init__(self, hidden: Tensor, weight: Tensor):
        self.acc, self.weight_dtype = torch.promote_types(hidden.dtype, torch.float32), weight.dtype
        self.hidden = torch.empty_like(hidden)
        self.weight = torch.zeros_like(weight, dtype=self.acc)
        self.bias = torch.zeros(weight.size(0), dtype=self.acc, device=weight.device)

    def add(self, rows: slice, probs: Tensor, crit: LabelSmoothing, target: Tensor, scale: Tensor,
            hidden: Tensor, w: Tensor) -> None:
        """Add a chunk's: ``probs`` its softmax (overwritten), ``scale`` the loss's gradient,
        ``w`` the weight in ``hidden``'s dtype, the products'."""
        grad = probs
        # softmax − q: q is `other` everywhere but the target (confidence) and padding (0).
        grad.sub_(crit.other)
        grad.scatter_add_(1, target.unsqueeze(1), grad.new_full((grad.size(0), 1), crit.other - crit.confidence))
        grad[:, crit.padding_idx] += crit.other
        grad.mul_(((target != crit.padding_idx).to(grad.dtype) * scale).unsqueeze(1))
        self.bias += grad.sum(0)
        grad = grad.to(hidden.dtype)
        self.hidden[rows] = grad @ w
        self.weight += grad.t() @ hidden[rows]

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.hidden, self.weight.to(self.weight_dtype), self.bias.to(self.weight_dtype)
