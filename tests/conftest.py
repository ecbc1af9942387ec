import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # Prepared corpora of the tests' runs (in this process and in the CLIs it starts) go
    # to a folder of this session, not to the checkout's data/prepared.
    import tempfile

    os.environ["TRANSFORMER_PREPARED"] = tempfile.mkdtemp(prefix="prepared-")
    # TEST_MATMUL_PRECISION=medium lets oneDNN compute float32 products in bf16 (as an AMX CPU
    # may be told to), so that a run of the suite shows which tolerances hang on the kernels.
    precision = os.environ.get("TEST_MATMUL_PRECISION")
    if precision:
        import torch

        torch.set_float32_matmul_precision(precision)


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(os.environ.pop("TRANSFORMER_PREPARED", ""), ignore_errors=True)


@pytest.fixture
def root() -> Path:
    """The project's root folder (where train.py and configs/ are)."""
    return ROOT


def run_cli(script: str, *args: str, input: str | None = None, cwd: Path | None = None):
    """Run one of the top-level scripts in a fresh interpreter; returns CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        input=input,
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=600,
    )


# Where the device-generic tests run: the CPU, and CUDA where there is one (on a GPU
# machine, benchmarks/gpu_check.py runs their files).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


# A model small enough to train a few steps in seconds, as train.py flags.
TINY = ["--set", "model.N=1", "--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "model.h=4"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A copy-task run of 3 steps by train.py: (its folder, the finished process)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    result = run_cli("train.py", "--config", "configs/copy.yaml", *TINY,
                     "--set", f"train.run_dir={run_dir}", "--set", "train.max_steps=3")
    assert result.returncode == 0, result.stderr
    return run_dir, result
