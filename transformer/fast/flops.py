"""Model FLOPs: the arithmetic a batch needs, counted by hand from the model's shape.

"Model FLOPs" count the matrix products the model must do for the real (non-padding)
tokens of a batch, as in the usual model-FLOPs-utilisation figure: a multiply-add is
2 FLOPs; attention counts its full score matrix (T_q x T_k per head, masked entries
included, as the kernels compute them); layer norms, softmax, dropout and the
optimizer are left out (they are a few percent). A training step costs three times the
forward pass: the backward pass computes two products (the gradients of the input and
of the weight) for each one of the forward pass.

Dividing by the step time gives the FLOP/s the model achieves; dividing that by a
measured matmul peak gives the utilisation (``benchmarks/train_speed.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from transformer.config import ModelConfig

if TYPE_CHECKING:
    from transformer.data.batching import Batch


def forward_flops(cfg: ModelConfig, tgt_vocab: int, src_lengths: Sequence[int], tgt_lengths: Sequence[int]) -> int:
    """FLOPs of one forward pass (with the output layer) over sentence pairs.

    Args:
        cfg: the model's shape (N, d_model, d_ff; the heads do not change the count).
        tgt_vocab: the output layer's size.
        src_lengths, tgt_lengths: per sentence pair, the source tokens and the decoder's
            input tokens (the target without its last token), padding excluded.
    """
    if len(src_lengths) != len(tgt_lengths):
        raise ValueError(f"{len(src_lengths)} source lengths for {len(tgt_lengths)} target lengths")
    d, f, n = cfg.d_model, cfg.d_ff, cfg.N
    s, t = sum(src_lengths), sum(tgt_lengths)
    ss = sum(a * a for a in src_lengths)
    tt = sum(b * b for b in tgt_lengths)
    ts = sum(a * b for a, b in zip(src_lengths, tgt_lengths))

    def linear(rows: int, d_in: int, d_out: int) -> int:
        return 2 * rows * d_in * d_out

    def attend(scores: int) -> int:  # Q Kᵀ and then P V, over all heads together
        return 2 * 2 * scores * d

    feed_forward = linear(s, d, f) + linear(s, f, d)
    encoder_layer = linear(s, d, 3 * d) + linear(s, d, d) + attend(ss) + feed_forward
    self_attn = linear(t, d, 3 * d) + linear(t, d, d) + attend(tt)
    src_attn = linear(t, d, d) + linear(s, d, 2 * d) + linear(t, d, d) + attend(ts)
    decoder_layer = self_attn + src_attn + linear(t, d, f) + linear(t, f, d)
    return n * (encoder_layer + decoder_layer) + linear(t, d, tgt_vocab)


def training_flops(cfg: ModelConfig, tgt_vocab: int, src_lengths: Sequence[int], tgt_lengths: Sequence[int]) -> int:
    """FLOPs of one forward and backward pass: three times the forward pass."""
    return 3 * forward_flops(cfg, tgt_vocab, src_lengths, tgt_lengths)


def batch_training_flops(cfg: ModelConfig, tgt_vocab: int, batch: Batch, pad: int) -> int:
    """``training_flops`` of a batch, its sentences' lengths read from its padding."""
    src_lengths = batch.src_mask.sum(dim=(1, 2)).tolist()
    tgt_lengths = (batch.tgt_in != pad).sum(dim=1).tolist()
    return training_flops(cfg, tgt_vocab, src_lengths, tgt_lengths)
