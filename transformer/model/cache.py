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
            get positional encodings from this offset. A tensor (B,) when the rows are
            at different steps (sentences that joined a batch being decoded): row i's
            self-attention keys are then the last ``length[i]`` of the cache's
            ``width`` columns, and the columns before them are padding it must not see.
    """

    layers: list[LayerCache]
    length: int | Tensor = 0

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
        if isinstance(self.length, Tensor):
            self.length = self.length[index]
        for layer in self.layers:
            layer.self_attn.reorder(index)
            if static_index is not None:
                layer.src_attn.reorder(static_index)

    @property
    def width(self) -> int:
        """Columns of the self-attention keys (positions of the longest row)."""
        k = self.layers[0].self_attn.k
        return 0 if k is None else k.size(2)

    def self_attention_mask(self, new: int, device: torch.device) -> Tensor | None:
        """What ``new`` positions may attend to: the cached keys of their own row and the
        new positions up to their own (None: everything, one new position of rows all at
        the same step).

        Shape: -> (B or 1, new, width + new).
        """
        if not isinstance(self.length, Tensor):
            past = self.length
            if new == 1:
                return None
            return torch.ones(1, new, past + new, dtype=torch.bool, device=device).tril(diagonal=past)
        width = self.width
        columns = torch.arange(width + new, device=device)
        first = (width - self.length).view(-1, 1, 1)  # each row's first column
        last = width + torch.arange(new, device=device).view(1, -1, 1)  # causal among the new ones
        return (columns >= first) & (columns <= last)

    def append_rows(self, other: "DecoderCache", src_width: int) -> None:
        """Add ``other``'s rows after this cache's, each row at its own step.

        Self-attention keys stay right-aligned (the narrower side is padded on the
        left; rows that have decoded nothing yet are all padding); encoder-decoder keys
        and values are padded on the right to ``src_width`` source positions (the
        source mask hides that padding).
        """
        rows = self.rows, other.rows
        width = max(self.width, other.width)
        for mine, theirs in zip(self.layers, other.layers):
            _append(mine.self_attn, theirs.self_attn, rows, width, left=True)
            _append(mine.src_attn, theirs.src_attn, rows, src_width, left=False)
        self.length = torch.cat([torch.as_tensor(c.length).expand(n) for c, n in zip((self, other), rows)])

    @property
    def rows(self) -> int:
        """The rows (sentences, or hypotheses) the cache holds."""
        if isinstance(self.length, Tensor):
            return self.length.numel()
        for layer in self.layers:
            for c in (layer.self_attn, layer.src_attn):
                if c.k is not None:
                    return c.k.size(0)
        return 0

    def trim(self, src_width: int | None = None) -> None:
        """Drop the self-attention columns no row sees any more (rows at different steps),
        and the encoder-decoder positions from ``src_width`` on."""
        keep = int(self.length.max()) if isinstance(self.length, Tensor) and self.length.numel() else self.width
        for layer in self.layers:
            c = layer.self_attn
            if c.k is not None and keep < c.k.size(2):
                c.k, c.v = c.k[:, :, c.k.size(2) - keep:], c.v[:, :, c.v.size(2) - keep:]
            c = layer.src_attn
            if src_width is not None and c.k is not None and src_width < c.k.size(2):
                c.k, c.v = c.k[:, :, :src_width].contiguous(), c.v[:, :, :src_width].contiguous()


def _append(a: KVCache, b: KVCache, rows: tuple[int, int], width: int, left: bool) -> None:
    """``a``'s rows then ``b``'s, each padded with zeros to ``width`` positions; a side
    without keys yet is all zeros."""
    like = a.k if a.k is not None else b.k
    if like is None:
        return

    def full(t: Tensor | None, n: int) -> Tensor:
        return like.new_zeros(n, like.size(1), width, like.size(3)) if t is None else _pad(t, width, left)

    a.k = torch.cat([full(a.k, rows[0]), full(b.k, rows[1])])
    a.v = torch.cat([full(a.v, rows[0]), full(b.v, rows[1])])


def _pad(t: Tensor, width: int, left: bool) -> Tensor:
    """Zeros added to dimension 2 of ``t`` (B, h, T, d_k), up to ``width``."""
    missing = width - t.size(2)
    if missing <= 0:
        return t
    zeros = t.new_zeros(t.size(0), t.size(1), missing, t.size(3))
    return torch.cat([zeros, t] if left else [t, zeros], dim=2)
