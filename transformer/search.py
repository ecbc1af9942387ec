"""Decoding: turn a source batch into target ids with a trained model."""

from __future__ import annotations

import torch
from torch import Tensor

from transformer.batching import subsequent_mask
from transformer.model import EncoderDecoder


@torch.no_grad()
def greedy_decode(
    model: EncoderDecoder,
    src: Tensor,
    src_mask: Tensor,
    max_len: int | Tensor,
    start_symbol: int,
    end_symbol: int | None = None,
    pad: int = 0,
    use_cache: bool = True,
) -> Tensor:
    """Pick the most probable next token until every sentence has ended.

    The whole batch is decoded at once. A sentence ends when it emits ``end_symbol`` or
    has generated ``max_len`` tokens; after that it is padded with ``pad``, and the loop
    stops when all sentences have ended.

    With ``use_cache`` each step feeds only the newest token and reuses the keys and
    values of the earlier ones. Without it, every step runs the decoder over the whole
    prefix, as the reference does; both give the same tokens.

    Args:
        max_len: tokens to generate at most, after the start symbol: one number for the
            batch or one per sentence (B,).

    Shape:
        src (B, S), src_mask (B, 1, S) -> (B, 1 + T), starting with ``start_symbol``.
    """
    batch = src.size(0)
    device = src.device
    limits = torch.as_tensor(max_len, device=device).expand(batch)
    memory = model.encode(src, src_mask)
    ys = torch.full((batch, 1), start_symbol, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = model.new_cache() if use_cache else None
    for step in range(int(limits.max())):
        if cache is not None:
            out, cache = model.decode(memory, src_mask, ys[:, -1:], None, cache)
        else:
            out = model.decode(memory, src_mask, ys, subsequent_mask(ys.size(1), device=device))
        log_probs = model.generator(out[:, -1])  # (B, V)
        log_probs[:, pad] = -torch.inf  # padding is never a word
        next_word = log_probs.argmax(dim=-1).masked_fill(finished, pad)
        ys = torch.cat([ys, next_word.unsqueeze(1)], dim=1)
        if end_symbol is not None:
            finished |= next_word == end_symbol
        finished |= limits <= step + 1
        if bool(finished.all()):
            break
    return ys


def strip_hypothesis(ids: Tensor | list[int], end_symbol: int | None, pad: int) -> list[int]:
    """Drop the start symbol, and everything from the end symbol (or padding) on."""
    out = []
    for i in ids[1:].tolist() if isinstance(ids, Tensor) else ids[1:]:
        if i == end_symbol or i == pad:
            break
        out.append(i)
    return out
