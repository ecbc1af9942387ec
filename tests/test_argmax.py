"""``argmax_rows`` and ``best_extensions`` (transformer/fast/decoding.py) against ``torch.argmax``
and ``torch.topk``: the same columns (ties and NaNs included) and values, whatever the width."""

import pytest
import torch

from transformer.fast.decoding import argmax_rows, best_extensions


@pytest.mark.parametrize("width", [300, 8000, 8003, 1000, 255])
def test_argmax_rows_is_argmax(width):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(64, width, generator=g)
    # Ties: the row's largest value twice, in two blocks, in one block, in the short last
    # block, and a row of equal values; then NaNs, the largest for argmax.
    top = x.max() + 1
    x[0, [width - 1, 5]] = top
    x[1, [3, 200]] = top
    x[2, [130, 129]] = top
    x[3, [width - 2, width - 1]] = top
    x[4] = 0.5
    x[5, [7, width - 3]] = float("nan")
    x[6, width - 1] = float("nan")
    x[7, :] = -torch.inf
    x[8, [11, 140]] = torch.inf
    for rows in (x, x[:, 1:], x.double(), x[:1]):  # a strided view, float64, one row
        assert torch.equal(argmax_rows(rows), rows.argmax(dim=1))


def test_argmax_rows_of_logits_is_greedy_argmax():
    """Random logits of a real width (8,000) and many rows, each row's maximum in a random block."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8000, generator=g)
    assert torch.equal(argmax_rows(x), x.argmax(dim=1))


@pytest.mark.parametrize("width", [8000, 8003, 2560, 640, 100])
@pytest.mark.parametrize("n", [1, 10])
def test_best_extensions_are_topk_over_a_sentences_prefixes(width, n):
    """The values of ``topk`` over a sentence's k rows side by side, largest first, at
    prefixes and words that hold them: with the best in one block, spread over blocks and
    prefixes, tied, with -inf columns (padding) and -inf prefixes (the first step)."""
    g = torch.Generator().manual_seed(width + n)
    b, k = 8, 5
    logits = torch.randn(b * k, width, generator=g)
    logits[:, 0] = -torch.inf
    logits[0, 64:64 + n] = 10.0 + torch.arange(n, dtype=logits.dtype)  # all in one block of one prefix
    logits[5:10, torch.arange(n) * (width // n)] = 10.0  # tied, one a block, on every prefix
    logits[10, -n:] = 20.0  # in the last block
    logits[15:20] = 1.0  # all equal
    scores = -torch.rand(b, k, generator=g) * 5
    scores[4, 1:] = -torch.inf  # the first step: one live prefix
    norm = logits[:, 1:].logsumexp(dim=1, keepdim=True)
    for dtype in (torch.float32, torch.float64):
        x, s, z = logits.to(dtype), scores.to(dtype), norm.to(dtype)
        values, prefix, word = best_extensions(x, s, z, n)
        every = (s.unsqueeze(-1) + (x - z).view(b, k, width)).view(b, k * width)
        assert torch.equal(values, every.topk(n, dim=1).values)
        assert torch.equal(every.gather(1, prefix * width + word), values)
        pairs = (prefix * width + word).tolist()
        assert all(len(set(p)) == n for p in pairs)  # n different extensions
    random = torch.randn(b * k, width, generator=g)  # no ties: the very same extensions
    every = (scores.unsqueeze(-1) + (random - norm).view(b, k, width)).view(b, k * width)
    _, prefix, word = best_extensions(random, scores, norm, n)
    assert torch.equal(prefix * width + word, every.topk(n, dim=1).indices)
