import math

import pytest
import torch
from conftest import DEVICES

from transformer.config import ConfigError, CopyTaskConfig, TrainConfig
from transformer.data.batching import Batch, pad_sequences
from transformer.model import make_model
from transformer.tasks.copy import CopyTask, data_gen
from transformer.training.schedule import rate
from transformer.training.trainer import Trainer

V = 11


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return make_model(V, V, N=1, d_model=32, d_ff=64, h=4, dropout=dropout)


def make_batch(seqs):
    """A copy batch (target = <s> + source) from lists of symbols."""
    return Batch(pad_sequences(seqs, 0), pad_sequences([[1, *s] for s in seqs], 0), pad=0)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_batch_fields():
    b = make_batch([[3, 4, 5], [6]])
    assert b.tgt_in.tolist() == [[1, 3, 4], [1, 6, 0]]
    assert b.tgt_out.tolist() == [[3, 4, 5], [6, 0, 0]]
    assert b.ntokens == 4
    assert b.src_mask.shape == (2, 1, 3) and b.src_mask.dtype == torch.bool
    assert b.src_mask[1, 0].tolist() == [True, False, False]
    # Row 1: no position may see the future nor the padding at position 2.
    assert b.tgt_mask[1].tolist() == [[True, False, False], [True, True, False], [True, True, False]]


def test_accumulated_gradient_is_the_token_average_of_one_big_batch():
    """Two micro-batches of different token counts give the gradient of their union."""
    a = [[3, 4, 5, 6, 7], [2, 2, 9, 3, 4]]
    b = [[8, 9], [5, 3, 10], [7]]
    cfg = TrainConfig(accum_steps=2)
    m1, m2 = tiny_model(), tiny_model()
    t1 = Trainer(m1, cfg, 0, torch.device("cpu"))
    t2 = Trainer(m2, cfg, 0, torch.device("cpu"))
    loss_split, n_split = t1.accumulate([make_batch(a), make_batch(b)])
    loss_one, n_one = t2.accumulate([make_batch(a + b)])
    assert n_split == n_one == 5 + 5 + 2 + 3 + 1
    torch.testing.assert_close(loss_split, loss_one, rtol=1e-5, atol=1e-5)
    for g1, g2 in zip(grads(m1), grads(m2)):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_schedule_steps_once_per_optimizer_step():
    """With accumulation 3, seven micro-batches are three optimizer steps and three
    schedule steps (the reference stepped the schedule per micro-batch)."""
    cfg = TrainConfig(accum_steps=3, warmup=10, lr_factor=1.0, epochs=1, log_every=1)
    model = tiny_model()
    trainer = Trainer(model, cfg, 0, torch.device("cpu"))
    batches = [make_batch([[3, 4, 5]]) for _ in range(7)]
    trainer.fit(lambda epoch, start: batches)
    assert trainer.state.step == 3
    assert trainer.scheduler.last_epoch == 3
    assert trainer.lr == pytest.approx(rate(3, 32, 1.0, 10))


def test_max_steps_bounds_the_run():
    cfg = TrainConfig(epochs=100, max_steps=4)
    trainer = Trainer(tiny_model(), cfg, 0, torch.device("cpu"))
    trainer.fit(lambda epoch, start: [make_batch([[3, 4]]) for _ in range(3)])
    # One epoch completed, and the second stopped after its first batch.
    assert trainer.state.step == 4 and trainer.state.epoch == 1 and trainer.state.batch_in_epoch == 1


def test_evaluate_runs_without_grad_and_restores_train_mode():
    model = tiny_model(dropout=0.1)
    trainer = Trainer(model, TrainConfig(), 0, torch.device("cpu"))
    model.train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), m.training)))
    loss = trainer.evaluate([make_batch([[3, 4, 5]]), make_batch([[6, 7]])])
    assert seen == [(False, False), (False, False)]
    assert model.training
    assert math.isfinite(loss) and loss > 0


def test_clipping_bounds_the_gradient_norm():
    cfg = TrainConfig(clip_grad_norm=1e-3)
    model = tiny_model()
    trainer = Trainer(model, cfg, 0, torch.device("cpu"))
    trainer.accumulate([make_batch([[3, 4, 5, 6]])])
    trainer.scaler.unscale_(trainer.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
    assert norm > cfg.clip_grad_norm  # the test is only meaningful if clipping does something
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total <= cfg.clip_grad_norm * 1.01


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_trains(device, amp):
    """Autocast steps (fp16's with its gradient scaler) lower the loss on a fixed batch
    and leave the weights in fp32."""
    if amp == "fp16" and device == "cpu":
        pytest.skip("fp16 autocast is for CUDA only (the config refuses it on the CPU)")
    cfg = TrainConfig(amp=amp, warmup=5, lr_factor=1.0)
    model = tiny_model().to(device)
    trainer = Trainer(model, cfg, 0, torch.device(device))
    batch = make_batch([[3, 4, 5, 6, 7, 8]] * 8)
    before = trainer.evaluate([batch])
    for _ in range(20):
        trainer.train_step([batch])
    assert trainer.evaluate([batch]) < before
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_weights_train_a_bf16_copy_and_update_the_fp32_weights(device):
    """train.amp bf16-weights: the steps run on a bf16 copy whose gradients, in fp32 and
    summed in fp32 over micro-batches, are the fp32 gradients up to bf16 rounding (about
    as close as bf16 autocast's); the model stays fp32, the copy follows it, and the
    loss goes down."""
    a, b = [[3, 4, 5, 6, 7], [2, 2, 9, 3, 4]], [[8, 9], [5, 3, 10], [7]]
    found = {}
    for amp in ("none", "bf16", "bf16-weights"):
        model = tiny_model().to(device)
        trainer = Trainer(model, TrainConfig(amp=amp, accum_steps=2), 0, torch.device(device))
        trainer.accumulate([make_batch(a), make_batch(b)])
        found[amp] = torch.cat([g.flatten() for g in grads(model)])
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    for name, p in trainer.bf16_copy.copy.named_parameters():
        assert p.dtype == (torch.float32 if "norm" in name else torch.bfloat16) and p.grad is None, name
    error = {amp: float((found[amp] - found["none"]).norm() / found["none"].norm()) for amp in ("bf16", "bf16-weights")}
    assert error["bf16-weights"] < min(0.05, 3 * error["bf16"]), error
    model = tiny_model().to(device)
    trainer = Trainer(model, TrainConfig(amp="bf16-weights", warmup=5, lr_factor=1.0), 0, torch.device(device))
    batch = make_batch([[3, 4, 5, 6, 7, 8]] * 8)
    before = trainer.evaluate([batch])
    for _ in range(20):
        trainer.train_step([batch])
    assert trainer.evaluate([batch]) < before
    trainer.bf16_copy.pull()
    for p, c in zip(model.parameters(), trainer.bf16_copy.copy.parameters()):
        assert torch.equal(c, p.to(c.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_the_bf16_copys_layer_norms_compute_in_float32(device):
    """The copy's layer norms take and give bf16 but compute in fp32 with fp32 weights:
    their weight and bias gradients, sums over every position of the batch, stay within
    bf16 rounding of the fp32 norm's on the same inputs."""
    from transformer.training.precision import Bf16Copy, Float32LayerNorm

    copy = Bf16Copy(tiny_model().to(device)).copy
    norms = [m for m in copy.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(type(m) is Float32LayerNorm and m.weight.dtype == torch.float32 for m in norms)
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4000, 256, generator=g) + torch.randn(256, generator=g)).to(device, torch.bfloat16)
    upstream = (1e-3 * torch.randn(4000, 256, generator=g)).to(device, torch.bfloat16)
    found = {}
    for kind in ("fp32", "copy"):
        norm = torch.nn.LayerNorm(256).to(device)
        if kind == "copy":
            norm.__class__ = Float32LayerNorm
        inputs = x.clone().requires_grad_() if kind == "copy" else x.float().requires_grad_()
        out = norm(inputs)
        assert out.dtype == inputs.dtype
        out.backward(upstream.to(out.dtype))
        found[kind] = [inputs.grad.float(), norm.weight.grad, norm.bias.grad]
    for got, want in zip(found["copy"], found["fp32"]):
        assert float((got - want).norm() / want.norm()) < 5e-3


def test_bf16_weights_under_ddp_sum_the_micro_batches_before_the_last_in_float32(monkeypatch):
    """Under DDP (``no_sync`` before the last micro-batch) each earlier micro-batch's
    gradients go to the fp32 model after its backward pass, as in one process; the last
    one's reach it through the all-reduce hook only (tests/test_distributed.py), so the
    copy's are dropped, not added a second time."""
    import contextlib

    class NoSyncRecorder:
        def __init__(self):
            self.calls = 0

        def no_sync(self):
            self.calls += 1
            return contextlib.nullcontext()

    trainer = Trainer(tiny_model(), TrainConfig(amp="bf16-weights", accum_steps=3), 0, torch.device("cpu"))
    trainer.ddp = NoSyncRecorder()  # the forward pass stays the copy's own
    pushed, dropped = [], []
    push, drop = trainer.bf16_copy.push_grads, trainer.bf16_copy.drop_grads
    monkeypatch.setattr(trainer.bf16_copy, "push_grads", lambda: (pushed.append(trainer.ddp.calls), push()))
    monkeypatch.setattr(trainer.bf16_copy, "drop_grads", lambda: (dropped.append(trainer.ddp.calls), drop()))
    trainer.accumulate([make_batch([[3, 4, 5]]), make_batch([[6, 7]]), make_batch([[8, 9, 10]])])
    assert pushed == [1, 2] and dropped == [2]  # after each no_sync micro-batch; the last one's dropped
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(c.grad is None for c in trainer.bf16_copy.copy.parameters())


@pytest.mark.slow
def test_compiled_training_matches_eager():
    """train.compile gives the eager run's losses and weights, dropout included (it draws
    the same numbers from torch's generator), over batches of several shapes."""
    batches = [make_batch(s) for s in ([[3, 4, 5, 6, 7]] * 4, [[8, 9], [5, 3, 10], [7]], [[2, 3, 4, 5, 6, 7, 8]] * 3)]
    runs = []
    for compiled in (False, True):
        model = tiny_model(dropout=0.1)
        # A large Adam epsilon: the attention keys' bias has a zero gradient in exact
        # arithmetic, and Adam would turn its rounding noise into full-size steps.
        cfg = TrainConfig(compile=compiled, warmup=5, adam_eps=0.01)
        trainer = Trainer(model, cfg, 0, torch.device("cpu"))
        torch.manual_seed(1)
        losses = [trainer.train_step([b])[0] for b in batches * 2]
        runs.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    (eager_loss, eager_weights), (compiled_loss, compiled_weights) = runs
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled_weights, eager_weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fp16_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="train.amp"):
        Trainer(tiny_model(), TrainConfig(amp="fp16"), 0, torch.device("cpu"))


def test_copy_task_batches_are_reproducible_and_well_formed():
    cfg = CopyTaskConfig(min_len=3, seq_len=10, batch_size=16, train_batches=4)
    a = list(CopyTask(cfg, seed=7).train_batches(2))
    b = list(CopyTask(cfg, seed=7).train_batches(2))
    c = list(CopyTask(cfg, seed=7).train_batches(3))
    assert len(a) == 4
    assert all(torch.equal(x.src, y.src) for x, y in zip(a, b))
    assert not all(torch.equal(x.src, y.src) for x, y in zip(a, c))
    for batch in a:
        lengths = (batch.src != 0).sum(1)
        assert lengths.min() >= 3 and lengths.max() <= 10
        assert (batch.tgt_in[:, 0] == 1).all()
        # The target is the source: tgt_out equals src wherever the source is real.
        real = batch.src != 0
        assert torch.equal(batch.tgt_out[:, : batch.src.size(1)][real], batch.src[real])
        assert batch.ntokens == int(real.sum())


def test_data_gen_symbols_in_range():
    batch = next(data_gen(CopyTaskConfig(), 1, torch.Generator().manual_seed(0)))
    assert batch.src.min() >= 1 and batch.src.max() <= 10 and batch.src.shape == (80, 10)


def test_max_minutes_bounds_the_run(monkeypatch):
    """With a clock that advances 10 s per reading, a 1-minute budget ends mid-epoch."""
    import transformer.training.state as state_module

    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(state_module.time, "perf_counter", lambda: next(clock))
    trainer = Trainer(tiny_model(), TrainConfig(epochs=100, max_minutes=1.0), 0, torch.device("cpu"))
    trainer.fit(lambda epoch, start: [make_batch([[3, 4]]) for _ in range(50)])
    # Still inside the first epoch: none completed, some of its batches trained on.
    state = trainer.state
    assert 1 <= state.step < 50 and state.epoch == 0 and state.batch_in_epoch == state.step
    assert state.train_seconds >= 60


def test_validate_every_n_steps_and_early_stop():
    """The validator runs every eval_every steps; asking to stop ends training there."""
    from transformer.training.callbacks import Validator

    class Counting(Validator):
        def __init__(self):  # no task or run directory: __call__ only counts
            self.seen = []

        def __call__(self, trainer):
            self.seen.append(trainer.state.step)
            return len(self.seen) == 3

    validator = Counting()
    trainer = Trainer(tiny_model(), TrainConfig(epochs=100, eval_every=2), 0, torch.device("cpu"), callbacks=[validator])
    trainer.fit(lambda epoch, start: [make_batch([[3, 4]]) for _ in range(5)])
    assert validator.seen == [2, 4, 6] and trainer.state.step == 6


@pytest.mark.parametrize("metric", ["score", "loss"])
def test_best_pt_and_patience_follow_train_best_metric(tmp_path, metric):
    """The score peaks at the second evaluation while the loss keeps falling: best.pt is
    that step with 'score' and the last with 'loss', and patience counts the same way."""
    from types import SimpleNamespace

    from transformer.config import Config
    from transformer.tasks import Score
    from transformer.training.callbacks import MetricsLog, Validator
    from transformer.training.checkpoint import load_checkpoint

    losses, scores = iter([3.0, 2.0, 1.0]), iter([1.0, 3.0, 2.0])
    task = SimpleNamespace(tokenizer=SimpleNamespace(pad_id=0, state_dict=lambda: {}), valid_batches=lambda: [],
                           score=lambda translator, loss: Score(next(scores)))
    trainer = Trainer(tiny_model(), TrainConfig(), 0, torch.device("cpu"))
    trainer.evaluate = lambda batches: next(losses)
    cfg = Config(train=TrainConfig(best_metric=metric, patience=1))
    validator = Validator(cfg, task, tmp_path, MetricsLog(tmp_path / "metrics.jsonl"), torch.device("cpu"))
    stops = []
    for step in (2, 4, 6):
        trainer.state.step = step
        stops.append(validator(trainer))
    assert load_checkpoint(tmp_path / "best.pt")["step"] == (4 if metric == "score" else 6)
    assert stops == ([False, False, True] if metric == "score" else [False, False, False])


def test_run_dir_with_checkpoints_is_never_reused(tmp_path):
    from transformer.config import Config, TrainConfig
    from transformer.training.run import new_run_dir

    cfg = Config(train=TrainConfig(run_dir=str(tmp_path / "run")))
    assert new_run_dir(cfg, "x") == tmp_path / "run"
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")  # a run that failed early
    assert new_run_dir(cfg, "x") == tmp_path / "run"
    (tmp_path / "run" / "last.pt").write_bytes(b"work to keep")
    with pytest.raises(ConfigError, match="already holds a run"):
        new_run_dir(cfg, "x")
    fresh = Config(train=TrainConfig(runs_root=str(tmp_path / "runs")))
    assert new_run_dir(fresh, "x") != new_run_dir(fresh, "x")  # default folders are always new


def test_train_py_gets_huge_pages_for_its_large_tensors():
    """Inside ``run_training``, called by ``train_main`` in a fresh process, a large tensor lies in
    transparent huge pages: torch reads its setting at its first CPU allocation, so a tensor made
    earlier (at any import or step of ``train_main`` before its memory settings) would leave it off."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("this kernel gives no transparent huge pages")
    code = textwrap.dedent("""
        import sys
        import transformer.training.run

        def probe(cfg, **kwargs):  # stands in for the training, before it makes any tensor
            import torch
            x = torch.ones(16 << 20)  # 64 MiB, touched
            inside = False
            for line in open("/proc/self/smaps"):
                field = line.split()
                if "-" in field[0]:
                    low, high = (int(a, 16) for a in field[0].split("-"))
                    inside = low <= x.data_ptr() < high
                elif inside and field[0] == "AnonHugePages:":
                    print(int(field[1]))
            sys.exit(0)

        transformer.training.run.run_training = probe
        from transformer.cli import train_main
        train_main([])
    """)
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) > 0, out.stdout
