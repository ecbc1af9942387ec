"""The benchmark scripts run against the package as it is: they import, and the ones that
can be made small run to the end on a tiny model. Their figures are not checked here."""

import importlib.util
import sys

import pytest
import torch
from conftest import ROOT, TINY, run_cli
from test_translation import slice_overrides, slices  # noqa: F401 (a fixture)
from torch import nn

from transformer.data.batching import Batch
from transformer.fast.packed import can_pack

SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "machine.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_imports_and_describes_itself(script):
    result = run_cli(f"benchmarks/{script}", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (it imports machine.py from its own folder)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # a dataclass in it looks its module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop(name, None)
    return module


def test_train_speed_builds_batches_of_the_length_asked():
    train_speed = load_benchmark("train_speed")
    batches = train_speed.synthetic_batches(16, 64, 50, 2)
    assert len(batches) == 2 and all(isinstance(b, Batch) for b in batches)
    assert all(b.src.shape == (4, 16) and b.tgt_out.shape == (4, 16) and b.ntokens == 64 for b in batches)


def test_copy_benchmark_and_gradient_error_run_on_a_tiny_model(tiny_run):
    result = run_cli("benchmarks/copy_task.py", "--seeds", "1", "--amp", "none", "--sequences", "20",
                     *TINY, "--set", "train.max_steps=3")
    assert result.returncode == 0, result.stderr
    assert "CPU:" in result.stdout and "exact" in result.stdout

    run_dir, _ = tiny_run
    result = run_cli("benchmarks/bf16_gradient_error.py", "--checkpoint", str(run_dir / "last.pt"), "--batches", "1")
    assert result.returncode == 0, result.stderr
    assert "attention in fp32" in result.stdout


def test_step_profile_runs_on_a_tiny_model():
    """With more warm-up steps than an epoch has (the copy task's 20)."""
    result = run_cli("benchmarks/step_profile.py", "--config", "configs/copy.yaml", *TINY, "--steps", "1", "--top", "3",
                     "--warmup", "21")
    assert result.returncode == 0, result.stderr
    assert "CPU:" in result.stdout and "matrix products" in result.stdout and "outside ops" in result.stdout
    assert "page faults a step" in result.stdout


def test_step_profile_takes_the_batches_epoch_after_epoch():
    step_profile = load_benchmark("step_profile")

    class Task:
        def train_batches(self, epoch):
            return [(epoch, 0), (epoch, 1)] if epoch < 3 else []

    assert list(step_profile.epochs(Task())) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_the_gpu_checks_set_only_keys_the_configs_take(tmp_path):
    """benchmarks/gpu_check.py runs where a GPU is lent, rarely and for minutes: every
    training run it plans must load with its overrides (a renamed key fails here, not
    there), and the runs it reads figures from must be distinct folders."""
    from transformer.config import load_config

    gpu_check = load_benchmark("gpu_check")
    for device in ("cuda", "cpu"):
        checks = gpu_check.plan(device, tmp_path, "configs/multi30k_base.yaml", 2.0, 100, quick=False)
        trained = [c for c in checks if c.run_dir is not None]
        assert len({c.run_dir for c in trained}) == len(trained) >= 4
        for check in trained:
            argv = check.argv[check.argv.index("--config") + 1 :]
            sets = [argv[i + 1] for i in range(1, len(argv), 2) if argv[i] == "--set"]
            cfg = load_config(ROOT / argv[0], sets)
            assert cfg.train.device == device and cfg.train.run_dir == str(check.run_dir), check.name
        assert any("fp16" in c.name for c in checks) == (device == "cuda")
    # The CPU check's flags are train_speed.py's, and it measures with two threads.
    cpu_step = next(c for c in checks if "train_speed.py" in " ".join(c.argv))
    flags = cpu_step.argv[[i for i, a in enumerate(cpu_step.argv) if a.endswith("train_speed.py")][0] + 1 :]
    assert load_benchmark("train_speed").build_parser().parse_args(flags).default_only
    assert cpu_step.env == {"OMP_NUM_THREADS": "2"}
    # The GPU image has no spacy: the test files it runs must not need it.
    for name in gpu_check.DEVICE_TESTS:
        assert "spacy" not in (ROOT / name).read_text(), name


def test_sampler_start_builds_the_lattices_of_as_many_words_as_asked(slices, tmp_path):  # noqa: F811
    """More distinct words than the slice holds: the rest are joined from two of its words."""
    overrides = [a for s in slice_overrides(slices, f"data.prepared={tmp_path}") for a in ("--set", s)]
    result = run_cli("benchmarks/sampler_start.py", "--words", "300,3000", *overrides)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "lattices built" in line]
    assert "CPU:" in result.stdout and [line.split()[0] for line in lines] == ["300", "3,000"], result.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_matmul_peak_names_the_kernels_it_can_try(dtype):
    """oneDNN's packed product (``PackedLinear``, which computes a product of the same size,
    tests/test_search.py) is tried where the weights can be packed: fp32 and bf16 on a CPU
    that has the kernels; float64 has only torch's."""
    machine = load_benchmark("machine")
    packable = can_pack(nn.Linear(2, 2, dtype=dtype))
    if dtype == torch.float64:
        assert not packable
    gflops, n, kernel = machine.matmul_peak(dtype, n=64, repeats=2, budget_s=0.01)
    assert gflops > 0 and n == 64
    assert kernel in (["torch", "oneDNN"] if packable else ["torch"])


def test_translate_speed_runs_each_decoder_in_its_own_process(tiny_run, tmp_path):
    """Every row decodes all the sentences (the reference's way in parts), and batched
    greedy decoding finds what the reference's way finds."""
    import gzip

    run_dir, _ = tiny_run
    lines = ["3 4 5 6 7", "7 6 5", "4 4 8 9 3 5", "5 6"] * 3
    for side in ("de", "en"):
        with gzip.open(tmp_path / f"test_2016_flickr.{side}.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    result = run_cli("benchmarks/translate_speed.py", "--checkpoint", str(run_dir / "last.pt"), "--data-dir",
                     str(tmp_path), "--repeat", "2", "--dtypes", "fp32", "--ctranslate2", "none")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("reference", "batched"))]
    assert [r.split("  ")[0] for r in rows[:4]] == ["reference (1 sentence, no cache)", "batched greedy, fp32",
                                                     "batched beam 5, fp32", "batched beam 5, fp32, patience 1"]
    assert "batched greedy, fp32 == reference way: 12 of 12 sentences identical" in result.stdout
