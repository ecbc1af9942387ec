"""Training on a bf16 copy of the model while the optimizer updates the fp32 weights.

Under bf16 autocast the weights stay fp32 and every step casts them to bf16 again, and
the activations go from bf16 to fp32 and back around the norms, the residual sums and
dropout: on a 2-core CPU those casts take about a tenth of a step. With
``train.amp: bf16-weights`` the forward and backward passes run on a bf16 copy of the
whole model instead (weights and activations in bf16, no casts inside the step). Its
gradients are cast to fp32 and added to the fp32 weights' own after every backward
pass, the optimizer updates the fp32 weights as before, and the copy takes them again
before the next forward pass: the fp32 weights are the "master copy" (fairseq's
``--bf16`` trains this way). Validation, checkpoints and averaging see only the fp32
model, so a checkpoint and its resume are as with autocast.

Under DDP (torchrun) the copy's gradients are still summed in fp32: every micro-batch
but the last adds its own to the fp32 weights' after its backward pass, as in one
process, and during the last one's backward pass a communication hook adds each bucket
of the copy's gradients to those sums in fp32, all-reduces them in fp32 and writes the
average into the fp32 weights' gradients. Nothing is all-reduced in bf16, so two
processes end a step with the weights of one process accumulating their batches.

The copy's layer norms alone compute in fp32, with fp32 weights: for a bf16 input,
torch's CPU kernel sums the norm's weight and bias gradients over the batch's positions
with about 5% error against the same norm in fp32 on the same inputs (its input's
gradient: 0.3%), while two casts per norm cost no measurable speed
(``benchmarks/bf16_gradient_error.py`` prints the gradient's error by group of parameters).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


class Float32LayerNorm(nn.LayerNorm):
    """A layer norm whose input is cast to fp32 and its output back to the input's type."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class Bf16Copy:
    """A bf16 copy of ``model`` to train on; ``pull`` and ``push_grads`` move weights
    and gradients between the two."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.model = model
        self.copy = copy.deepcopy(model).to(dtype)
        for module in self.copy.modules():
            if type(module) is nn.LayerNorm:
                module.float().__class__ = Float32LayerNorm
        # The same modules in the same order, so the same parameters (tied ones once).
        self._params, self._copies = list(model.parameters()), list(self.copy.parameters())
        if [p.shape for p in self._params] != [c.shape for c in self._copies]:
            raise RuntimeError("the bf16 copy's parameters do not match the model's")

    @torch.no_grad()
    def pull(self) -> None:
        """The model's weights and train/eval mode into the copy."""
        torch._foreach_copy_(self._copies, self._params)
        self.copy.train(self.model.training)

    @torch.no_grad()
    def push_grads(self) -> None:
        """Add the copy's gradients, in fp32, to the model's; clear the copy's."""
        for p, c in zip(self._params, self._copies):
            if c.grad is None:
                continue
            if p.grad is None:
                p.grad = c.grad.to(p.dtype)
            else:
                p.grad.add_(c.grad)
            c.grad = None

    def drop_grads(self) -> None:
        """Clear the copy's gradients (their all-reduced sum is in the model's already)."""
        for c in self._copies:
            c.grad = None

    def reduce_in_float32(self, ddp: DistributedDataParallel) -> None:
        """Make ``ddp`` (wrapping the copy) all-reduce, in fp32, the sum of each bucket's
        gradients and the model's own (the earlier micro-batches'), into the model's
        gradients; the copy's keep this process's last micro-batch's (``drop_grads``)."""
        master = {id(c): p for p, c in zip(self._params, self._copies)}

        # Unannotated: DDP checks the annotations' values, which this module's postponed
        # annotations would turn into strings.
        def hook(group, bucket):
            params = [master[id(c)] for c in bucket.parameters()]
            total = torch.cat([(g.float() if p.grad is None else p.grad + g).flatten()
                               for p, g in zip(params, bucket.gradients())])
            total.div_(dist.get_world_size(group))

            def into_model(done: torch.futures.Future[list[Tensor]]) -> Tensor:
                reduced = done.value()[0]
                start = 0
                for p in params:
                    p.grad = reduced[start:start + p.numel()].view_as(p)
                    start += p.numel()
                return bucket.buffer()

            return dist.all_reduce(total, group=group, async_op=True).get_future().then(into_model)

        ddp.register_comm_hook(None, hook)
