"""Which kernel computes attention, and beam search's sharing of key rows.

``MultiHeadedAttention`` calls ``attend`` for softmax(Q Kᵀ / √d_k) V; every path below
gives the article's ``attention()`` up to rounding (tests compare them).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: nn.Dropout, use_sdpa: bool) -> Tensor:
    """softmax(Q Kᵀ / √d_k) V, with dropout on the weights while training.

    The kernel:

    * ``F.scaled_dot_product_attention`` (when ``use_sdpa``): its fused kernels pay off
      over many query positions (training, encoding, teacher forcing);
    * the explicit product, the article's ``attention()``: for the one new position
      of a cached decoding step (2-3x faster than SDPA on the CPU at beam search's
      sizes), and in CPU training with attention dropout, where SDPA would fall back
      to the explicit product anyway with torch's slower dropout mask (see
      ``transformer.fast.dropout``).

    With fewer key rows than query rows (beam search), see ``attend_shared``.

    Shape:
        q (B, h, T_q, d_k), k and v (B', h, T_k, d_k), mask broadcastable to
        (B', h, T_q, T_k) -> (B, h, T_q, d_k).
    """
    if k.size(0) < q.size(0):
        return attend_shared(q, k, v, mask, dropout, use_sdpa)
    return _product(q, k, v, mask, dropout, use_sdpa, q.size(2))


def attend_shared(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: nn.Dropout, use_sdpa: bool) -> Tensor:
    """``attend`` where each key row serves ``B / B'`` consecutive query rows.

    Beam search's k hypotheses of a sentence share its encoder output: their queries
    attend together, as more positions of one row, so the encoder-decoder keys and
    values are projected and kept once per sentence, not once per hypothesis.

    Shape:
        q (B, h, T_q, d_k), k and v (B', h, T_k, d_k), mask (B', 1, 1, T_k) -> (B, h, T_q, d_k).
    """
    rows, h, t, d = q.shape
    group = rows // k.size(0)
    if group * k.size(0) != rows:
        raise ValueError(f"{rows} query rows cannot share {k.size(0)} key rows")
    if mask is not None and mask.size(-2) != 1:
        raise ValueError("shared key rows need a mask that is the same for every query position")
    q = q.view(-1, group, h, t, d).transpose(1, 2).reshape(-1, h, group * t, d)
    x = _product(q, k, v, mask, dropout, use_sdpa, t)
    return x.view(-1, h, group, t, d).transpose(1, 2).reshape(rows, h, t, d)


def _product(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: nn.Dropout, use_sdpa: bool,
             new_positions: int) -> Tensor:
    """The kernel choice of ``attend``; ``new_positions`` is T_q before any sharing of key rows."""
    from transformer.model.attention import attention  # the article's function (its module imports this one)

    training = dropout.training and dropout.p > 0
    cpu_dropout = training and q.device.type == "cpu"
    if use_sdpa and not cpu_dropout and (dropout.training or new_positions > 1):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout.p if training else 0.0)
    return attention(q, k, v, mask=mask, dropout=dropout)[0]
