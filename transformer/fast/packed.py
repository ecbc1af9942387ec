"""Linear layers whose weights are laid out once for oneDNN, for decoding on the CPU.

``nn.Linear`` passes its weight as it is stored to the matrix-product library at every
call. oneDNN's inner product can instead take a copy of the weight laid out once in its
own blocked format: at decoding's shapes (tens to hundreds of rows times 256 to 8,000
columns) it is faster in float32 and bfloat16 on the CPUs measured here
(docs/performance.md). The same kernels serve torch.compile's CPU inference ("freezing").

The copy is made once and does not follow later changes to the weight, so it is for a
model that only decodes: ``Translator`` packs a copy of its model (training's validation
builds a new Translator each time). Outputs equal ``nn.Linear``'s up to rounding.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.model.architecture import PositionwiseFeedForward


def can_pack(model: nn.Module) -> bool:
    """Whether this torch has the kernels and ``model``'s weights suit them (on the CPU,
    in float32 or bfloat16)."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return False
    weight = next((m.weight for m in model.modules() if isinstance(m, nn.Linear)), None)
    return weight is not None and _packable(weight)


def _packable(weight: Tensor) -> bool:
    """Whether oneDNN's CPU inner product takes this weight (on the CPU, fp32 or bf16)."""
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward, on a copy of the weight in oneDNN's layout.

    The original weight and bias stay the module's parameters (same names, same
    sharing, e.g. a generator tied to the embeddings), so the model's state, parameter
    count and exports are unchanged. Copying the module or casting it (``.to``) packs
    the new weight again; on a device or in a dtype oneDNN does not take, it computes as
    ``nn.Linear``.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._pack()

    def _pack(self) -> None:
        w = self.weight
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None) if _packable(w) else None

    def forward(self, x: Tensor) -> Tensor:
        if not self.takes(x):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def takes(self, x: Tensor) -> bool:
        """Whether the packed weight computes the product with ``x``."""
        return self.packed is not None and x.dtype == self.weight.dtype

    def relu(self, x: Tensor) -> Tensor:
        """``F.relu(self(x))`` in one oneDNN call, which applies the ReLU to each block of
        the output as it is computed; for ``x`` that ``takes`` accepts."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "relu", [], "")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._pack()
        return self

    def __deepcopy__(self, memo: dict) -> "PackedLinear":
        # The packed tensor has no storage to copy: copy the parameters (through ``memo``,
        # which keeps tied ones tied) and pack again.
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = copy.deepcopy(self.weight, memo), copy.deepcopy(self.bias, memo)
        copied = PackedLinear(linear)
        copied.train(self.training)
        memo[id(self)] = copied
        return copied

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedFeedForward(PositionwiseFeedForward):
    """``PositionwiseFeedForward`` on ``PackedLinear`` layers, its ReLU computed by W₁'s
    product (without dropout, i.e. in eval mode or with p = 0).

    The separate ReLU reads and writes the (rows, d_ff) activations once more, into fresh
    memory: fused, test2016 decoded in 1-2% less time with two workers and 3-7% less on
    one thread (docs/performance.md). The children are the original module's, under the
    same names.
    """

    def __init__(self, ff: PositionwiseFeedForward):
        nn.Module.__init__(self)
        self.w_1, self.w_2, self.dropout = ff.w_1, ff.w_2, ff.dropout
        self.train(ff.training)

    def forward(self, x: Tensor) -> Tensor:
        w_1 = self.w_1
        if (self.training and self.dropout.p > 0) or not isinstance(w_1, PackedLinear) or not w_1.takes(x):
            return super().forward(x)
        return self.w_2(w_1.relu(x))


def packed_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers are ``PackedLinear`` (and whose
    feed-forward layers are ``PackedFeedForward``); ``model`` itself when it has no
    linear layer left to pack."""
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child))
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is PositionwiseFeedForward:
                setattr(module, name, PackedFeedForward(child))
    return model
