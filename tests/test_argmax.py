"""``argmax_rows`` and ``topk_rows`` (transformer/fast/decoding.py) against ``torch.argmax``
and ``torch.topk``: the same columns (ties and NaNs included) and values, whatever the width."""

import pytest
import torch

from transformer.fast.decoding import argmax_rows, topk_rows


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


@pytest.mark.parametrize("width", [8000, 8003, 640, 100])
@pytest.mark.parametrize("k", [1, 10])
def test_topk_rows_is_topk(width, k):
    """The same values, largest first, at columns that hold them: with the k largest in
    one block, spread over blocks, tied, and with -inf columns (padding in beam search)."""
    g = torch.Generator().manual_seed(width + k)
    x = torch.randn(40, width, generator=g)
    x[:, 0] = -torch.inf
    x[0, 64:64 + k] = 10.0 + torch.arange(k, dtype=x.dtype)  # all in one block
    x[1, torch.arange(k) * (width // k)] = 10.0  # tied, one a block
    x[2, -k:] = 20.0  # in the last block
    x[3, :] = 1.0  # all equal
    for rows in (x, x[:, 1:], x.double()):
        values, cols = topk_rows(rows, k)
        expected = rows.topk(k, dim=1)
        assert torch.equal(values, expected.values)
        assert torch.equal(rows.gather(1, cols), values)
        assert all(len(set(c)) == k for c in cols.tolist())  # k different columns
    random = torch.randn(300, width, generator=g)  # no ties: the very same columns
    assert torch.equal(topk_rows(random, k)[1], random.topk(k, dim=1).indices)
