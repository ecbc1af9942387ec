"""Scaled dot-product attention and multi-head attention, as the article writes them.

Mask convention (the only one in this package): a mask is a bool tensor in which
True means "this query may attend to this key". It is the convention of
``torch.nn.functional.scaled_dot_product_attention``; beware that
``torch.nn.Transformer`` uses the opposite one. Masks are built in
``transformer.data.batching`` and broadcast against scores of shape (B, h, T_q, T_k).

What differs from the reference lives outside ``MultiHeadedAttention``: which kernel
computes the product, and beam search's sharing of key rows (``transformer.fast.attend``);
the keys and values kept between decoding steps (``transformer.model.cache``). The
module keeps no attention weights: ``weights`` computes them on request.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from transformer.fast.attend import attend
from transformer.fast.dropout import Dropout
from transformer.model.cache import KVCache


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


class MultiHeadedAttention(nn.Module):
    """h parallel attention heads over d_model / h dimensions each.

    Args:
        h: number of heads; must divide d_model.
        d_model: model width.
        dropout: on the attention weights (the reference always used 0.1 here).
        use_sdpa: let ``F.scaled_dot_product_attention`` compute the product where it
            is the faster kernel; otherwise always the explicit ``attention()``.

    Shape:
        query (B, T_q, d_model), key and value (B', T_k, d_model), where B' = B or, in
        beam search, B' divides B (each key row serves B / B' consecutive query rows),
        mask (B', T_q or 1, T_k) -> (B, T_q, d_model).
    """

    def __init__(self, h: int, d_model: int, dropout: float = 0.1, use_sdpa: bool = True):
        super().__init__()
        if d_model % h != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by the number of heads h ({h})")
        self.d_k = d_model // h  # d_v = d_k
        self.h = h
        self.linears = nn.ModuleList([nn.Linear(d_model, d_model) for _ in range(4)])  # Q, K, V, output
        self.dropout = Dropout(dropout)
        self.use_sdpa = use_sdpa

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        """Attend from ``query`` to ``key``/``value``; with a ``cache`` (decoding), keys
        and values of earlier calls are reused and the new ones added to it."""
        if mask is not None:
            mask = mask.unsqueeze(1)  # the same mask for every head
        q = self._heads(self.linears[0](query))  # (B, h, T_q, d_k)
        if cache is not None and cache.ready:  # encoder-decoder keys and values, made at the first step
            k, v = cache.k, cache.v
        else:
            k, v = self.keys_values(key, value)
            if cache is not None:
                k, v = cache.update(k, v)
        x = attend(q, k, v, mask, self.dropout, self.use_sdpa)  # (B, h, T_q, d_k)
        return self.linears[3](x.transpose(1, 2).reshape(query.shape))  # concatenate the heads

    def keys_values(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """The projected keys and values of every head.

        Shape: key, value (B, T_k, d_model) -> (B, h, T_k, d_k) each.
        """
        return self._heads(self.linears[1](key)), self._heads(self.linears[2](value))

    def weights(self, query: Tensor, key: Tensor, mask: Tensor | None = None) -> Tensor:
        """The attention weights of every head for these inputs (for pictures).

        Shape: query (B, T_q, d_model), key (B, T_k, d_model) -> (B, h, T_q, T_k).
        """
        q, k = self._heads(self.linears[0](query)), self._heads(self.linears[1](key))
        mask = None if mask is None else mask.unsqueeze(1)
        return attention(q, k, k, mask)[1]  # the weights alone: any values would do

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.h, self.d_k).transpose(1, 2)  # (B, h, T, d_k)
