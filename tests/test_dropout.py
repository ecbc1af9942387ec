"""The CPU dropout: the right drop rate, an unbiased output, the matching gradient,
reproducible from the seed, and nn.Dropout itself where it does not apply."""

import math

import pytest
import torch
from torch import nn

from transformer.fast.dropout import LEVELS, Dropout, cpu_dropout, random_int16


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_rate_and_scale(p, dtype):
    torch.manual_seed(0)
    x = torch.ones(500, 400, dtype=dtype)
    y = cpu_dropout(x, p)
    assert y.dtype == dtype and y.shape == x.shape
    n = x.numel()
    dropped = (y == 0).sum().item()
    assert abs(dropped - p * n) < 5 * math.sqrt(n * p * (1 - p))  # five standard deviations
    kept = y[y != 0]
    expected = (LEVELS / (LEVELS - round(p * LEVELS)))
    torch.testing.assert_close(kept, torch.full_like(kept, expected), rtol=0, atol=0)
    assert abs(y.float().mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / n)  # unbiased


def test_gradient_is_the_same_mask():
    torch.manual_seed(1)
    x = torch.randn(300, 70, requires_grad=True)
    y = cpu_dropout(x, 0.3)
    y.backward(torch.ones_like(y))
    kept = y.detach() != 0
    torch.testing.assert_close(x.grad, kept.float() / (1 - round(0.3 * LEVELS) / LEVELS))


def test_masks_follow_the_seed_and_change_between_calls():
    x = torch.ones(64, 64)
    torch.manual_seed(7)
    a, b = cpu_dropout(x, 0.5), cpu_dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(cpu_dropout(x, 0.5), a)
    assert not torch.equal(a, b)


def test_every_bit_of_the_random_numbers_is_a_fair_coin():
    torch.manual_seed(5)
    n = 200_000
    numbers = random_int16(n).to(torch.int32) & 0xFFFF
    bits = (numbers.unsqueeze(1) >> torch.arange(16)) & 1  # (n, 16)
    ones = bits.sum(0).double()
    assert (abs(ones - n / 2) < 5 * math.sqrt(n / 4)).all(), ones  # five standard deviations
    # Neighbouring numbers (from one 64-bit word and across words) are not tied together.
    assert abs((numbers[1:] == numbers[:-1]).float().mean().item() - 2**-16) < 1e-4


def test_odd_sizes_and_extreme_probabilities():
    x = torch.ones(3, 5, 7)  # not a multiple of four elements
    assert cpu_dropout(x, 0.5).shape == x.shape
    assert torch.equal(cpu_dropout(x, 1e-6), x)  # rounds to 0: nothing dropped
    assert torch.equal(cpu_dropout(x, 1.0), torch.zeros_like(x))


def test_module_is_nn_dropout_and_idle_in_eval_mode():
    m = Dropout(0.4)
    assert isinstance(m, nn.Dropout) and m.p == 0.4 and not list(m.state_dict())
    x = torch.randn(10, 10)
    assert torch.equal(m.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    torch.manual_seed(3)
    assert (m.train()(torch.ones(100, 100)) == 0).any()
