"""The key/value cache of incremental decoding, kept outside the model.

The caller creates a cache, passes it to ``EncoderDecoder.decode`` and keeps it between
steps, so the modules themselves hold no state between calls (as in x-transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Keys and values one attention sublayer has already computed.

    Attributes:
        k, v: projected keys and values, (B, h, T, d_k); None until the first call.
        static: True for encoder-decoder attention, whose keys and values come from
            the encoder output and are computed once; False for self-attention, whose
            keys and values grow by the new positions at every call.
    """

    k: Tensor | None = None
    v: Tensor | None = None
    static: bool = False

    @property
    def ready(self) -> bool:
        """Whether the keys and values are complete as they are (encoder-decoder attention after its first call)."""
        return self.static and self.k is not None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Take one call's keys and values; return all those the call attends to.

        Self-attention appends the new positions to the cached ones. Encoder-decoder
        attention keeps its keys and values contiguous: as views of the projection, every
        later step's product would copy them to fold (B, h) into one batch dimension.
        """
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        elif self.static:
            k, v = k.contiguous(), v.contiguous()
        self.k, self.v = k, v
        return k, v

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` (in that order), e.g. after a beam step."""
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


@dataclass
class LayerCache:
    """One decoder layer's cache: its self-attention and its encoder-decoder attention."""

    self_attn: KVCache = field(default_factory=KVCache)
    src_attn: KVCache = field(default_factory=lambda: KVCache(static=True))


@dataclass
class DecoderCache:
    """Everything incremental decoding keeps between steps.

    Attributes:
        layers: one ``LayerCache`` per decoder layer.
        length: how many target positions have been decoded so far; the next tokens
            get positional encodings from this offset.
    """

    layers: list[LayerCache]
    length: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> "DecoderCache":
        return cls(layers=[LayerCache() for _ in range(n_layers)])

    def reorder(self, index: Tensor, static: Tensor | bool = True) -> None:
        """Keep the batch rows ``index``, in that order (beam search reorders hypotheses).

        ``static`` says what the encoder-decoder keys and values do: True, follow
        ``index`` too; False, stay as they are (right when ``index`` only moves rows
        among hypotheses of the same sentence, which share them); a tensor, keep those
        rows of them instead (beam search keeps one row per sentence, see
        ``transformer.fast.attend``, and drops the sentences that are done).
        """
        static_index = index if static is True else static if isinstance(static, Tensor) else None
        for layer in self.layers:
            layer.self_attn.reorder(index)
            if static_index is not None:
                layer.src_attn.reorder(static_index)
