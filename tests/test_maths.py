"""The article's mathematical claims, checked as properties of the code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer.fast.output_loss import output_layer_loss
from transformer.model import Generator, sinusoid_table
from transformer.training.loss import LabelSmoothing
from transformer.config import TrainConfig
from transformer.model import make_model
from transformer.training.schedule import cooldown, make_scheduler, rate
from transformer.training.trainer import Trainer

# --------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("d_k", [16, 64, 256])
def test_dot_product_variance_grows_with_d_k_and_scaling_restores_unit(d_k):
    """Var(q·k) ≈ d_k for unit-variance components, and Var(q·k/√d_k) ≈ 1."""
    torch.manual_seed(0)
    n = 20000
    q = torch.randn(n, d_k, dtype=torch.float64)
    k = torch.randn(n, d_k, dtype=torch.float64)
    dots = (q * k).sum(-1)
    assert dots.var().item() == pytest.approx(d_k, rel=0.1)
    assert (dots / math.sqrt(d_k)).var().item() == pytest.approx(1.0, rel=0.1)


# --------------------------------------------------------------------------- positions


def frequencies(d_model: int) -> torch.Tensor:
    """w_i = 10000^(-2i/d), straight from the formula (float64)."""
    return 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)


def shift_matrix(k: int, d_model: int) -> torch.Tensor:
    """M_k for row vectors: [sin, cos](a) @ [[cos b, -sin b], [sin b, cos b]] = [sin, cos](a + b), b = k·w_i."""
    blocks = []
    for w in frequencies(d_model).tolist():
        c, s = math.cos(k * w), math.sin(k * w)
        blocks.append(torch.tensor([[c, -s], [s, c]], dtype=torch.float64))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("d_model", [8, 16, 32])
@pytest.mark.parametrize("k", [1, 3, 17, 100])
def test_positional_shift_is_a_fixed_linear_map(d_model, k):
    """PE(pos + k) = PE(pos) @ M_k for every pos, with M_k built from k and the frequencies only."""
    max_len = 400
    pe = sinusoid_table(max_len, d_model).double()
    n = max_len - k
    torch.testing.assert_close(pe[:n] @ shift_matrix(k, d_model), pe[k:], atol=1e-4, rtol=0)


def test_positional_shift_transposed_rotation_is_wrong():
    """The check above discriminates: the transposed blocks do not map PE(pos) to PE(pos + k)."""
    pe = sinusoid_table(100, 8).double()
    wrong = shift_matrix(5, 8).T
    assert (pe[:95] @ wrong - pe[5:]).abs().max() > 0.1


@pytest.mark.parametrize("k", [1, 5, 37])
def test_positional_shift_recovered_by_least_squares(k):
    """The least-squares M with PE[0:n] @ M = PE[k:k+n] fits exactly and equals the constructed M_k."""
    d_model, max_len = 8, 500
    pe = sinusoid_table(max_len, d_model).double()
    n = max_len - k
    fitted = torch.linalg.lstsq(pe[:n], pe[k : k + n]).solution
    torch.testing.assert_close(pe[:n] @ fitted, pe[k : k + n], atol=1e-4, rtol=0)
    torch.testing.assert_close(fitted, shift_matrix(k, d_model), atol=1e-4, rtol=0)


def test_sinusoid_table_follows_the_formula():
    """sinusoid_table matches PE(pos,2i)=sin(pos·w_i), PE(pos,2i+1)=cos(pos·w_i)."""
    d_model, max_len = 16, 50
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
    angles = pos * frequencies(d_model)
    pe = sinusoid_table(max_len, d_model).double()
    torch.testing.assert_close(pe[:, 0::2], angles.sin(), atol=1e-5, rtol=0)
    torch.testing.assert_close(pe[:, 1::2], angles.cos(), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- Noam schedule


@pytest.mark.parametrize("d_model,factor,warmup", [(512, 1.0, 400), (32, 2.0, 50), (64, 0.5, 7)])
def test_noam_rate_peaks_at_warmup(d_model, factor, warmup):
    """Over 1..3·warmup, rate peaks at step == warmup with factor·(d_model·warmup)^-0.5, rising before, falling after."""
    steps = list(range(1, 3 * warmup + 1))
    rates = [rate(s, d_model, factor, warmup) for s in steps]
    peak = max(range(len(rates)), key=rates.__getitem__)
    assert steps[peak] == warmup
    assert rates[peak] == pytest.approx(factor * (d_model * warmup) ** -0.5, rel=1e-12)
    before, after = rates[:warmup], rates[warmup - 1 :]
    assert all(a < b for a, b in zip(before, before[1:]))
    assert all(a > b for a, b in zip(after, after[1:]))


def test_noam_rate_step_zero_equals_step_one():
    """rate(0) == rate(1): step 0 is treated as step 1 (no division by zero)."""
    assert rate(0, 512, 1.0, 4000) == rate(1, 512, 1.0, 4000)
    assert rate(0, 512, 1.0, 4000) > 0


def test_make_scheduler_sets_lr_to_rate():
    """With base lr 1, after n calls to scheduler.step() the optimizer's lr is rate(n)."""
    d_model, factor, warmup = 32, 2.0, 10
    param = nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([param], lr=1.0)
    sched = make_scheduler(opt, d_model, factor, warmup)
    assert opt.param_groups[0]["lr"] == pytest.approx(rate(0, d_model, factor, warmup))
    for n in range(1, 31):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(rate(n, d_model, factor, warmup), rel=1e-12)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_the_cooldown_falls_linearly_to_zero_over_the_last_fraction(fraction):
    assert cooldown(0.0, fraction) == 1.0 and cooldown(1.0, fraction) == (1.0 if fraction == 0 else 0.0)
    assert cooldown(1.5, fraction) == (1.0 if fraction == 0 else 0.0)  # past the end: no negative rate
    if fraction:
        assert cooldown(1 - fraction, fraction) == 1.0
        assert cooldown(1 - fraction / 4, fraction) == pytest.approx(0.25)


def test_the_trainer_cools_the_rate_down_by_steps_or_by_the_clock():
    torch.manual_seed(0)
    model = make_model(11, 11, N=1, d_model=32, d_ff=64, h=4)
    cfg = TrainConfig(max_steps=10, cooldown=0.4, warmup=3, lr_factor=2.0)
    trainer = Trainer(model, cfg, pad_id=0, device=torch.device("cpu"))
    rates = []
    for _ in range(10):
        trainer.optimizer_step()
        rates.append(trainer.lr)
    expected = [rate(n, 32, 2.0, 3) * min(1.0, (1 - n / 10) / 0.4) for n in range(1, 11)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[5] == pytest.approx(rate(6, 32, 2.0, 3)) and rates[-1] == 0.0
    # By the clock: 45 of 60 seconds spent, half of the last half of the run.
    trainer = Trainer(model, TrainConfig(max_minutes=1.0, cooldown=0.5, warmup=3), pad_id=0,
                      device=torch.device("cpu"))
    trainer.stopping.elapsed = lambda state: 45.0
    trainer.optimizer_step()
    assert trainer.lr == pytest.approx(rate(1, 32, 1.0, 3) * 0.5)


def test_a_cooldown_without_the_runs_length_says_so_and_keeps_the_rate(caplog):
    model = make_model(11, 11, N=1, d_model=32, d_ff=64, h=4)
    with caplog.at_level("WARNING"):
        trainer = Trainer(model, TrainConfig(cooldown=0.5, warmup=3), pad_id=0, device=torch.device("cpu"))
    assert "train.cooldown" in caplog.text and "max_steps" in caplog.text
    for _ in range(4):
        trainer.optimizer_step()
    assert trainer.lr == pytest.approx(rate(4, 32, 1.0, 3))


# --------------------------------------------------------------------------- label smoothing

V, PAD = 7, 0


def make_batch(seed: int = 0):
    torch.manual_seed(seed)
    target = torch.tensor([3, PAD, 1, 6, PAD, 2, 5, 4])
    logits = torch.randn(target.numel(), V, dtype=torch.float64)
    return logits.log_softmax(-1).detach().requires_grad_(True), target


def test_smoothed_targets_structure():
    """Smoothed rows sum to 1 (non-pad), hold 1-ε on the target, 0 on padding, ε/(V-2) elsewhere; pad rows are 0."""
    eps = 0.2
    _, target = make_batch()
    dist = LabelSmoothing(V, PAD, eps).smoothed_targets(target).double()
    real = target != PAD
    torch.testing.assert_close(dist[real].sum(-1), torch.ones(int(real.sum()), dtype=torch.float64))
    torch.testing.assert_close(dist[real].gather(1, target[real].unsqueeze(1)).squeeze(1),
                               torch.full((int(real.sum()),), 1 - eps, dtype=torch.float64))
    assert (dist[:, PAD] == 0).all()
    assert (dist[~real] == 0).all()
    other = torch.ones_like(dist, dtype=torch.bool)
    other.scatter_(1, target.unsqueeze(1), False)
    other[:, PAD] = False
    other[~real] = False
    torch.testing.assert_close(dist[other], torch.full_like(dist[other], eps / (V - 2)))


@pytest.mark.parametrize("eps", [0.1, 0.4])
def test_label_smoothing_equals_kldiv_in_value_and_gradient(eps):
    """forward(x, t) equals KLDivLoss(sum)(x, smoothed_targets(t)), and so does its gradient in x."""
    x, target = make_batch()
    crit = LabelSmoothing(V, PAD, eps)
    loss = crit(x, target)
    (grad,) = torch.autograd.grad(loss, x)
    ref_loss = nn.KLDivLoss(reduction="sum")(x, crit.smoothed_targets(target).to(x.dtype))
    (ref_grad,) = torch.autograd.grad(ref_loss, x)
    # forward() computes in float32, hence the float32-level tolerances.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert (grad[target == PAD] == 0).all()


def test_label_smoothing_without_smoothing_is_summed_nll():
    """With ε = 0 the loss is nll_loss summed over the non-pad targets."""
    x, target = make_batch(1)
    loss = LabelSmoothing(V, PAD, 0.0)(x, target)
    ref = F.nll_loss(x, target, ignore_index=PAD, reduction="sum")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,smoothing", [(2, 0.1), (1, 0.0), (5, 1.0), (5, 1.5), (5, -0.1)])
def test_label_smoothing_rejects_invalid_arguments(size, smoothing):
    """A vocabulary under 3 classes or a smoothing outside [0, 1) raises ValueError."""
    with pytest.raises(ValueError):
        LabelSmoothing(size, 0, smoothing)


@pytest.mark.parametrize("grad_scale", [None, 1.7, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [3, 4, 100])
def test_fused_output_loss_equals_kldiv_in_value_and_gradients(eps, chunk, grad_scale):
    """output_layer_loss (output layer + loss, chunked, hand-written backward) == the KL form,
    in value and in the gradients of the states, the weight and the bias; with the gradients
    made in the forward pass for the factor the backward pass brings (1.7), and for another
    (0.5: they are rescaled)."""
    torch.manual_seed(0)
    crit = LabelSmoothing(9, 0, eps)
    generator = Generator(5, 9).double()
    hidden = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 2, 3, 4])  # padding included
    params = [hidden, generator.proj.weight, generator.proj.bias]
    fused = output_layer_loss(crit, hidden, generator, target, chunk=chunk, grad_scale=grad_scale)
    fused_grads = torch.autograd.grad(1.7 * fused, params)
    kl = nn.KLDivLoss(reduction="sum")(generator(hidden), crit.smoothed_targets(target, torch.float64))
    kl_grads = torch.autograd.grad(1.7 * kl, params)
    torch.testing.assert_close(fused, kl, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, kl_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert fused_grads[0][target == 0].abs().max() == 0  # padding rows get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_loss_gradients_made_ahead_equal_the_backward_passes_to_the_bit(dtype):
    """With ``grad_scale`` equal to the loss's factor (training's 1 / tokens) the gradients
    made in the forward pass are the backward pass's own, bit for bit, in fp32 and bf16."""
    torch.manual_seed(0)
    crit = LabelSmoothing(50, 0, 0.1)
    generator = Generator(16, 50).to(dtype)
    hidden = torch.randn(37, 16, dtype=dtype)
    target = torch.randint(0, 50, (37,))
    target[:3] = 0  # padding rows too
    factor = 1 / 37
    results = []
    for grad_scale in (None, factor):
        h = hidden.clone().requires_grad_()
        generator.zero_grad(set_to_none=True)
        loss = output_layer_loss(crit, h, generator, target, chunk=8, grad_scale=grad_scale)
        (loss * factor).backward()
        results.append((loss.detach(), h.grad, generator.proj.weight.grad, generator.proj.bias.grad))
    (loss_later, *later), (loss_ahead, *ahead) = results
    torch.testing.assert_close(loss_ahead, loss_later)
    for a, b in zip(ahead, later):
        assert a.dtype == dtype and torch.equal(a, b)
