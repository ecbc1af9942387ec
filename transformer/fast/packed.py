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
        if self.packed is None or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

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


def packed_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers are ``PackedLinear``; ``model``
    itself when it has none left to pack."""
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child))
    return model
