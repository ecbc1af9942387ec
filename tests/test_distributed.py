"""Several processes (torchrun, gloo on 127.0.0.1): they keep identical weights, equal to
one process accumulating the same groups of batches, and a stopped run resumes exactly."""

import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT

from transformer.config import load_config
from transformer.training.checkpoint import load_checkpoint
from transformer.training.run import run_training

# The copy task, small; validation every 3 steps; on the CPU also where there is a GPU
# (two processes cannot share one GPU under NCCL, and these tests are gloo's).
SETTINGS = ["model.N=1", "model.d_model=32", "model.d_ff=64", "model.h=4", "data.copy.batch_size=16",
            "train.eval_every=3", "train.device=cpu"]

# train.py, with each process's final weights written beside the run (rank 1's never
# reach a checkpoint) and, with STOP_AT, rank 1 alone asking to stop after that step
# (as a signal to that one process would).
LAUNCHER = textwrap.dedent("""
    import os, sys
    import torch
    from transformer.cli import train_main
    from transformer.training.trainer import Trainer

    fit, train_step = Trainer.fit, Trainer.train_step
    stop_at = int(os.environ.get("STOP_AT", "0"))

    def fit_and_dump(self, *args, **kwargs):
        out = fit(self, *args, **kwargs)
        torch.save(self.model.state_dict(), os.path.join(os.environ["DUMP_DIR"], f"rank{self.dist.rank}.pt"))
        return out

    def step_and_stop(self, *args, **kwargs):
        out = train_step(self, *args, **kwargs)
        if self.state.step == stop_at and self.dist.rank == 1:
            self.stopping.requested = True
        return out

    Trainer.fit, Trainer.train_step = fit_and_dump, step_and_stop
    sys.exit(train_main())
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, dump_dir, *args, stop_at=0):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    dump_dir.mkdir(exist_ok=True)
    env = {"DUMP_DIR": str(dump_dir), "STOP_AT": str(stop_at), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(launcher), *args,
    ]
    import os

    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def settings(*extra):
    return [a for s in [*SETTINGS, *extra] for a in ("--set", s)]


def weights(path):
    return torch.load(path, weights_only=True)


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.slow
def test_two_processes_equal_one_accumulating_their_batches(tmp_path):
    """Epochs of 8 batches: 4 steps of 2 (one per process); 6 steps cross an epoch's end."""
    # A learning rate high enough that the weights move far beyond the tolerance, and an
    # Adam epsilon large enough that the updates follow the gradients' scale (Adam would
    # hide a gradient twice too large) and rounding noise in a zero gradient stays small.
    common = [
        "model.dropout=0", "data.copy.train_batches=8", "train.max_steps=6", "train.warmup=10", "train.lr_factor=1",
        "train.adam_eps=0.01",
    ]
    run = tmp_path / "ddp"
    result = torchrun(tmp_path, tmp_path / "dump", "--config", "configs/copy.yaml",
                      *settings(*common, f"train.run_dir={run}"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [str(run)]  # printed once, not once per process
    rank0, rank1 = weights(tmp_path / "dump" / "rank0.pt"), weights(tmp_path / "dump" / "rank1.pt")
    assert_same(rank0, rank1)  # the processes' weights stay bit for bit equal
    saved = load_checkpoint(run / "last.pt")
    assert (saved["step"], saved["epoch"], saved["trainer"]["batch_in_epoch"]) == (6, 1, 4)
    assert all(not name.startswith("module.") for name in saved["model"])
    assert_same(saved["model"], rank0)
    assert len(saved["trainer"]["rng_ranks"]) == 2

    # One process accumulating 2 batches a step sees the same groups, and computes the same
    # numbers: on one thread, as each torchrun process (OMP_NUM_THREADS=1), the kernels are
    # the same, and the scalings DDP adds (x2 per process, /2 after the sum) are exact.
    # float32 products at torch's default precision, as in the torchrun processes (whatever
    # TEST_MATMUL_PRECISION set in this one).
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    try:
        single = run_training(load_config(ROOT / "configs" / "copy.yaml", [
            *SETTINGS, *common, "train.accum_steps=2", f"train.run_dir={tmp_path / 'single'}",
        ]))
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
    one = load_checkpoint(single.run_dir / "last.pt")
    assert one["step"] == 6
    assert_same(one["model"], rank0)
    moved = max((one["model"][n] - init).abs().max().item() for n, init in initial_weights().items())
    assert moved > 1e-2  # the comparison means something: training changed the weights


def initial_weights():
    """The copy model's weights before training, as every run above starts from them."""
    from transformer.data.tokenizers import IdTokenizer
    from transformer.training.checkpoint import build_model

    cfg = load_config(ROOT / "configs" / "copy.yaml", SETTINGS)
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, IdTokenizer(cfg.data.copy.vocab_size)).state_dict()


@pytest.mark.slow
def test_a_distributed_run_stopped_by_one_process_resumes_exactly(tmp_path):
    """Dropout on (each process its own masks) and 2 micro-batches per process and step;
    epochs of 9 batches, so each epoch is 2 steps of 4 and leaves one batch out. Rank 1
    alone asks to stop during step 2: the wish travels with the next step's all-reduce,
    so all stop together after step 3 (inside epoch 2); resumed, the run ends as the
    uninterrupted one."""
    common = ["model.dropout=0.2", "data.copy.train_batches=9", "train.accum_steps=2", "train.max_steps=6"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    result = torchrun(tmp_path, tmp_path / "whole-dump", "--config", "configs/copy.yaml",
                      *settings(*common, f"train.run_dir={whole}"))
    assert result.returncode == 0, result.stderr
    assert "epoch 1: 1 batches left out" in (whole / "train.log").read_text()
    assert_same(weights(tmp_path / "whole-dump" / "rank0.pt"), weights(tmp_path / "whole-dump" / "rank1.pt"))

    result = torchrun(tmp_path, tmp_path / "cut-dump", "--config", "configs/copy.yaml",
                      *settings(*common, f"train.run_dir={cut}"), stop_at=2)
    # Rank 0 exits with 130, as on SIGINT (torchrun itself then says 1), rank 1 with 0.
    assert result.returncode == 1 and "exitcode  : 130" in result.stderr, result.stderr
    assert f"continue with: python train.py --resume {cut}" in result.stderr
    assert load_checkpoint(cut / "last.pt")["step"] == 3
    result = torchrun(tmp_path, tmp_path / "cut-dump", "--resume", str(cut))
    assert result.returncode == 0, result.stderr

    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(cut / "last.pt")
    position = lambda state: (state["step"], state["epoch"], state["trainer"]["batch_in_epoch"])  # noqa: E731
    # Saved by the validation at step 6, inside epoch 3, after its 8 batches.
    assert position(a) == position(b) == (6, 2, 8)
    assert_same(a["model"], b["model"])
    assert_same(weights(tmp_path / "cut-dump" / "rank0.pt"), weights(tmp_path / "cut-dump" / "rank1.pt"))
    for rank in range(2):
        assert torch.equal(a["trainer"]["rng_ranks"][rank]["rng_cpu"], b["trainer"]["rng_ranks"][rank]["rng_cpu"])
    assert not torch.equal(a["trainer"]["rng_ranks"][0]["rng_cpu"], a["trainer"]["rng_ranks"][1]["rng_cpu"])


@pytest.mark.slow
@pytest.mark.parametrize("amp, accum, atol, sp_alpha", [
    ("bf16", 1, 0.0, 0.0), ("bf16-weights", 1, 0.0, 0.0), ("bf16-weights", 2, 1e-6, 0.0), ("bf16", 1, 0.0, 0.5),
])
def test_two_processes_train_from_one_prepared_corpus_as_one_process_does(tmp_path, amp, accum, atol, sp_alpha):
    """Translation: rank 0 prepares the corpus while rank 1 waits, both read the same
    files, and the weights equal one process's that accumulates their batches and reuses
    the prepared corpus as it is. With bf16 autocast, and with a bf16 copy of the weights,
    the gradients are summed and all-reduced in fp32, so the weights are equal: bit for
    bit with one micro-batch per process, and up to the order of fp32 additions with two
    (~1e-9 here; summed in bf16, they would differ by ~1e-4). With data.sp_alpha all
    three processes sample the same segmentation of the corpus."""
    from test_prepare import multi30k_pairs, write_corpus

    pairs = multi30k_pairs("train", 600)
    corpus = {"train": write_corpus(tmp_path, "train", pairs), "valid": write_corpus(tmp_path, "valid", pairs[:20])}
    prepared = tmp_path / "prepared"
    common = [
        f"data.train=[{corpus['train'][0]}, {corpus['train'][1]}]", f"data.valid=[{corpus['valid'][0]}, "
        f"{corpus['valid'][1]}]", "data.vocab_size=500", "data.batch_tokens=600", f"data.prepared={prepared}",
        "model.N=1", "model.d_model=32", "model.d_ff=64", "model.h=4", "model.dropout=0", "decode.max_len_b=5",
        "train.max_steps=4", "train.warmup=10", "train.lr_factor=1", "train.adam_eps=0.01", f"train.amp={amp}",
        f"data.sp_alpha={sp_alpha}",
    ]
    run = tmp_path / "ddp"
    per_process = [*common, f"train.accum_steps={accum}", f"train.run_dir={run}"]
    result = torchrun(tmp_path, tmp_path / "dump", "--config", "configs/multi30k.yaml",
                      *[a for s in per_process for a in ("--set", s)])
    assert result.returncode == 0, result.stderr
    assert (run / "train.log").read_text().count("preparing ") == 1
    built = (prepared / "manifest.json").read_text()
    rank0 = weights(tmp_path / "dump" / "rank0.pt")
    assert_same(rank0, weights(tmp_path / "dump" / "rank1.pt"))

    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    try:
        one_process = [*common, f"train.accum_steps={2 * accum}", f"train.run_dir={tmp_path / 'one'}"]
        single = run_training(load_config(ROOT / "configs" / "multi30k.yaml", one_process))
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
    assert (prepared / "manifest.json").read_text() == built  # reused, not rebuilt
    one = load_checkpoint(single.run_dir / "last.pt")
    assert one["step"] == 4
    assert_same(one["model"], rank0, atol=atol)
