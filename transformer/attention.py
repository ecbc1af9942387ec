"""Scaled dot-product attention, multi-head attention and the key/value cache.

Mask convention (the only one in this package): a mask is a bool tensor in which
True means "this query may attend to this key". It is the convention of
``torch.nn.functional.scaled_dot_product_attention``; beware that
``torch.nn.Transformer`` uses the opposite one. Masks are built in
``transformer.batching`` and broadcast against scores of shape (B, h, T_q, T_k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.dropout import Dropout


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    dropout: nn.Module | None = None,
) -> tuple[Tensor, Tensor]:
    """Compute softmax(Q Kᵀ / √d_k) V explicitly, as the article writes it.

    Dividing by √d_k keeps the scores at unit variance: for q and k with independent
    unit-variance components, q·k is a sum of d_k unit-variance terms, so its variance
    is d_k, and large scores would push the softmax into regions with tiny gradients.

    Args:
        query, key, value: projected inputs.
        mask: bool, True = may attend; broadcastable to (..., T_q, T_k).
        dropout: applied to the attention weights.

    Returns:
        The attended values and the attention weights.

    Shape:
        query (..., T_q, d_k), key (..., T_k, d_k), value (..., T_k, d_v) ->
        (..., T_q, d_v) and (..., T_q, T_k).
    """
    d_k = query.size(-1)
    scores = query @ key.transpose(-2, -1) / math.sqrt(d_k)  # (..., T_q, T_k)
    if mask is not None:
        # The most negative finite value rather than -inf: a fully masked row then
        # gives a uniform distribution instead of NaN.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    p_attn = scores.softmax(dim=-1)
    if dropout is not None:
        p_attn = dropout(p_attn)
    return p_attn @ value, p_attn


@dataclass
class KVCache:
    """Keys and values one attention sublayer has already computed.

    The cache lives outside the module: the caller creates it, passes it in and keeps
    it, so the modules themselves hold no state between calls.

    Attributes:
        k, v: projected keys and values, (B, h, T, d_k); None until the first call.
        static: True for encoder-decoder attention, whose keys and values come from
            the encoder output and are computed once; False for self-attention, whose
            keys and values grow by the new positions at every call.
    """

    k: Tensor | None = None
    v: Tensor | None = None
    static: bool = False

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` (in that order), e.g. after a beam step."""
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


class MultiHeadedAttention(nn.Module):
    """h parallel attention heads over d_model / h dimensions each.

    Args:
        h: number of heads; must divide d_model.
        d_model: model width.
        dropout: dropout on the attention weights (the reference always used 0.1 here,
            whatever the model's dropout; this one follows the argument).
        use_sdpa: use ``F.scaled_dot_product_attention`` (fused kernels); otherwise the
            explicit ``attention()`` above, which also yields the weights.
    """

    def __init__(self, h: int, d_model: int, dropout: float = 0.1, use_sdpa: bool = True):
        super().__init__()
        if d_model % h != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by the number of heads h ({h})")
        self.d_k = d_model // h
        self.h = h
        # Query, key, value and output projections, in the reference's order.
        self.linears = nn.ModuleList([nn.Linear(d_model, d_model) for _ in range(4)])
        self.dropout_p = dropout
        self.dropout = Dropout(dropout)
        self.use_sdpa = use_sdpa
        # Set by ``record_attention``: keep the last weights in ``self.attn``, as the
        # reference always did (for its pictures); off otherwise, as SDPA has none.
        self.keep_attention = False
        self.attn: Tensor | None = None

    def _split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.h, self.d_k).transpose(1, 2)  # (B, h, T, d_k)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: (B, T_q, d_model).
            key, value: (B, T_k, d_model). With a static cache that is already filled
                they are not looked at.
            mask: bool, True = may attend; (B, T_q, T_k) or (B, 1, T_k), or None.
                With a self-attention cache, T_k counts the cached positions too.
            cache: keys and values from earlier calls, updated in place.

        Shape:
            returns (B, T_q, d_model).
        """
        q = self._split_heads(self.linears[0](query))  # (B, h, T_q, d_k)
        if cache is not None and cache.static and cache.k is not None:
            k, v = cache.k, cache.v
        else:
            k = self._split_heads(self.linears[1](key))  # (B', h, T_k, d_k)
            v = self._split_heads(self.linears[2](value))
            if cache is not None:
                if cache.k is not None:  # self-attention: append the new positions
                    k = torch.cat([cache.k, k], dim=2)
                    v = torch.cat([cache.v, v], dim=2)
                elif cache.static:
                    # Stored contiguous: as views of the projection, every later step's
                    # product would copy them to fold (B, h) into one batch dimension.
                    k, v = k.contiguous(), v.contiguous()
                cache.k, cache.v = k, v
        if mask is not None:
            mask = mask.unsqueeze(1)  # same mask for every head: (B', 1, T_q or 1, T_k)

        rows, t = q.size(0), q.size(2)
        # Fewer key rows than query rows: each key row serves ``group`` consecutive query
        # rows (beam search's k hypotheses of one sentence share its encoder output).
        # Those queries then attend together, as more positions of one row: the keys
        # and values are projected and kept once per sentence, not once per hypothesis.
        group = rows // k.size(0)
        if group * k.size(0) != rows:
            raise ValueError(f"{rows} query rows cannot share {k.size(0)} key rows")
        if group > 1:
            if mask is not None and mask.size(-2) != 1:
                raise ValueError("shared key rows need a mask that is the same for every query position")
            q = q.view(-1, group, self.h, t, self.d_k).transpose(1, 2).reshape(-1, self.h, group * t, self.d_k)

        # SDPA's fused kernels pay off over many query positions; for the one new
        # position of a cached decoding step the explicit product is faster (2-3x on
        # the CPU at beam search's sizes).
        # Training on the CPU with attention dropout, SDPA falls back to the explicit
        # product anyway, with torch's slower dropout mask (see ``transformer.dropout``).
        cpu_dropout = self.training and self.dropout_p > 0 and q.device.type == "cpu"
        if self.use_sdpa and not self.keep_attention and not cpu_dropout and (self.training or t > 1):
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
            )
        else:
            x, p_attn = attention(q, k, v, mask=mask, dropout=self.dropout)
            if self.keep_attention:
                self.attn = _ungroup(p_attn, group, t)
        x = _ungroup(x, group, t)  # (B, h, T_q, d_k)
        x = x.transpose(1, 2).reshape(rows, t, self.h * self.d_k)  # (B, T_q, d_model)
        return self.linears[3](x)


def _ungroup(x: Tensor, group: int, t: int) -> Tensor:
    """Undo the grouping of query rows: (B', h, group * T_q, n) -> (B' * group, h, T_q, n)."""
    if group == 1:
        return x
    b, h, _, n = x.shape
    return x.view(b, h, group, t, n).transpose(1, 2).reshape(b * group, h, t, n)
