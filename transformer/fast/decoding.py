"""Decoding on the CPU with less padding and less fresh memory.

Each gives what the plain call gives (``model.encode``, ``model.logits``,
``logsumexp``, ``argmax``, ``topk``'s values) at every position that matters; tests
compare them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer.fast.packed import PackedLinear
from transformer.model.architecture import EncoderDecoder


def encode_in_pieces(model: EncoderDecoder, src: Tensor, src_mask: Tensor, tokens: int = 2048) -> Tensor:
    """``model.encode`` on the CPU a few rows at a time, each piece only as wide as its
    longest sentence.

    Sentences are encoded independently, so the result is the same at every real
    position; padding, which the mask hides from the decoder, may hold other values
    (zeros past a piece's width). Two things are saved on the CPU:

    * memory: a piece has at most ``tokens`` padded tokens. A batch of 8,192 tokens has
      feed-forward activations of 32 MiB each, and memory touched for the first time
      costs page faults;
    * padding: a batch is as wide as its longest sentence, but pieces cut from its rows
      sorted by length are narrower.

    Shape:
        src (B, S), src_mask (B, 1, S) -> (B, S, d_model).
    """
    batch, width = src.shape
    if src.device.type != "cpu" or batch == 0:
        return model.encode(src, src_mask)
    # Each row's width: up to its last real token (a row without any is left whole).
    real = src_mask[:, 0]
    widths = (width - real.flip(-1).int().argmax(-1)).tolist()
    order = sorted(range(batch), key=widths.__getitem__)
    memory = None
    start = 0
    while start < batch:
        # The longest piece of rows (in order of width) within ``tokens``, one row at least.
        end = start + 1
        while end < batch and (end + 1 - start) * widths[order[end]] <= tokens:
            end += 1
        rows = torch.tensor(order[start:end], device=src.device)
        w = widths[order[end - 1]]
        piece = model.encode(src[rows, :w], src_mask[rows, :, :w])
        if memory is None:
            memory = piece.new_zeros(batch, width, piece.size(-1))
        memory[rows, :w] = piece
        start = end
    return memory


class LogitBuffer:
    """``model.logits`` written into one buffer, reused at every step.

    Beam search's logits of all rows (41 MB at 256 sentences x 5 beams x 8,000 words in
    float32) are more than glibc's malloc reuses: without the buffer they are fresh
    memory, with page faults, at every step.

    Args:
        rows: the most rows a step has.

    For decoding: writing into the buffer runs under ``torch.no_grad()``.
    """

    def __init__(self, model: EncoderDecoder, rows: int, device: torch.device):
        self.model = model
        proj = model.generator.proj
        self.buffer = torch.empty((rows, proj.out_features), dtype=proj.weight.dtype, device=device)

    def __call__(self, hidden: Tensor) -> Tensor:
        """Shape: hidden (R, d_model), R at most ``rows`` -> (R, V), a view of the buffer."""
        proj = self.model.generator.proj
        if (proj.bias is None or hidden.dtype != self.buffer.dtype or torch.is_autocast_enabled(hidden.device.type)
                or isinstance(proj, PackedLinear)):
            return proj(hidden)
        return torch.addmm(proj.bias, hidden, proj.weight.t(), out=self.buffer[: hidden.size(0)])


def logsumexp_rows(logits: Tensor, rows: int = 32) -> Tensor:
    """``logits.logsumexp(dim=1, keepdim=True)``, to a few units in the last place, ``rows``
    rows at a time.

    A row's logsumexp is its largest value m plus log(sum(exp(x - m))). Softmax's largest
    value is exp(0) / sum(exp(x - m)), so the second term is minus its log. Torch's softmax
    is one fused pass on the CPU, where its logsumexp makes four (max, subtract, exp,
    sum): at 640 rows of 8,000 on one thread, 3.2 ms against 12.3 (docs/performance.md).
    The temporary of each piece is small enough for malloc to reuse from the heap, instead
    of fresh memory, page-faulted in at every step.

    Shape: (R, V) -> (R, 1).
    """
    parts = []
    for part in logits.split(rows):
        top = part.amax(dim=1, keepdim=True)
        parts.append(top - torch.softmax(part, dim=1).amax(dim=1, keepdim=True).log())
    return torch.cat(parts)


def argmax_rows(x: Tensor, block: int = 128) -> Tensor:
    """``x.argmax(dim=1)``: the first column of each row's largest value.

    On the CPU torch's argmax over rows of 8,000 scores costs about 1 ns a column (256
    rows: 2.4 ms on one thread here), its ``amax`` about 0.05. So the row's blocks of
    ``block`` columns get their maxima first, and the argmax runs only over those and
    over the winning block's columns: the first block holding the row's largest value,
    then the first column of it there, which is the first column of the whole row (a
    NaN, largest for argmax and amax alike, is found the same way).

    Shape: (R, V) -> (R,).
    """
    rows, n = x.shape
    if x.device.type != "cpu" or n < 2 * block:
        return x.argmax(dim=1)
    whole = n // block * block
    maxima = x[:, :whole].reshape(rows, whole // block, block).amax(2)
    if whole < n:
        maxima = torch.cat([maxima, x[:, whole:].amax(1, keepdim=True)], dim=1)
    # The winning block's columns; a last, shorter block repeats its last column, which
    # cannot come first among equals.
    cols = (maxima.argmax(1, keepdim=True) * block + torch.arange(block, device=x.device)).clamp_(max=n - 1)
    return cols.gather(1, x.gather(1, cols).argmax(1, keepdim=True)).squeeze(1)


def best_extensions(logits: Tensor, scores: Tensor, log_norm: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each sentence's ``n`` best extensions of its k prefixes, best first: the largest
    ``scores[g, j] + (logits[g·k + j, w] - log_norm[g·k + j])`` over its prefixes j and
    words w, with their j and w (``n`` at most k·V).

    The same values as each row's ``topk`` followed by the sentence's, found by blocks of
    32 (or 64) columns: a block's largest logit bounds its columns' values (the sum is
    monotone in the logit, rounding included), so the n blocks of a sentence with the
    largest bounds hold its n best, and ``topk`` runs over the sentence's k·V / 32 bounds
    and then over those n blocks' columns. On the CPU, ``topk`` over all of a row's 8,000
    columns costs about 1.7 ns a column, and over a sentence's five rows of 250 bounds
    about 7 times what one row of its 1,250 bounds costs (torch sorts fewer than 64·n
    columns another way; docs/performance.md). Among equal values the extensions may be
    others. Rows that no block of 32 or 64 columns divides, or too short for n blocks to
    save work, take ``topk`` itself.

    Shape: logits (b·k, V), scores (b, k), log_norm (b·k, 1) -> values, prefixes j, words w, each (b, n).
    """
    (b, k), vocab = scores.shape, logits.size(1)
    block = next((c for c in (32, 64) if vocab % c == 0 and 4 * n * c <= vocab), None)
    if logits.device.type != "cpu" or block is None:
        width = min(n, vocab)  # a row's best n, which k rows of them always outnumber (n <= k·V)
        row_logits, row_word = logits.topk(width, dim=1)
        candidates = (scores.unsqueeze(-1) + (row_logits - log_norm).view(b, k, width)).view(b, k * width)
        values, at = candidates.topk(n, dim=1)
        return values, at // width, row_word.view(b, k * width).gather(1, at)
    maxima = logits.reshape(b * k, vocab // block, block).amax(2)
    bounds = (scores.view(b * k, 1) + (maxima - log_norm)).view(b, -1)  # (b, k·V / block)
    blocks = bounds.topk(n, dim=1).indices
    # A sentence's k rows side by side, (b, k·V): block i of that row starts at column i·block.
    cols = (blocks.unsqueeze(2) * block + torch.arange(block, device=logits.device)).view(b, n * block)
    prefix = cols // vocab
    row_norm = log_norm.view(b, k).gather(1, prefix)
    found = scores.gather(1, prefix) + (logits.reshape(b, k * vocab).gather(1, cols) - row_norm)
    values, at = found.topk(n, dim=1)
    return values, prefix.gather(1, at), cols.gather(1, at) % vocab
