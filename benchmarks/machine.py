"""What machine a benchmark ran on: every script prints this first.

The development machines change CPU model between sessions (an AMD EPYC without AMX,
an Intel Xeon with AMX, whose bf16 products run about 6x its fp32 ones), so absolute
figures only compare within one run, and every figure needs its CPU named beside it.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from transformer.fast.packed import PackedLinear, can_pack


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``platform.processor()`` is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The matrix and vector extensions that decide which kernels torch and oneDNN pick."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return [f for f in wanted if f in flags]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that timings are of work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", n: int = 2048, repeats: int = 10,
                budget_s: float = 3.0) -> tuple[float, int, str]:
    """The best GFLOP/s of an n x n x n product over up to ``repeats`` tries, the n used,
    and the kernel that reached it.

    On the CPU two kernels are tried: torch's product (``a @ b``: MKL in fp32, oneDNN in
    bf16) and oneDNN's inner product on a weight laid out for it, the kernel our decoding
    uses (``transformer.fast.packed``). Either may be the faster: on an AMD EPYC MKL's
    fp32 product ran at 101-106 GFLOP/s a core and oneDNN's at 240 (docs/performance.md),
    so ``a @ b`` alone would halve the machine's fp32 peak. The tries of each stop once
    they have taken ``budget_s`` seconds (after two at least). Where one product of size n
    would take longer than that (bf16 on a CPU without AVX-512 BF16 or AMX is emulated at
    a few GFLOP/s: minutes for 2048), the product shrinks until it fits, so that the
    figure costs seconds wherever it is taken.
    """
    device = torch.device(device)

    def seconds(product) -> float:
        sync(device)
        start = time.perf_counter()
        product()
        sync(device)
        return time.perf_counter() - start

    probe = torch.randn(256, 256, device=device, dtype=dtype)
    seconds(lambda: probe @ probe)  # the first call pays for kernel selection
    per_flop = seconds(lambda: probe @ probe) / 256**3
    while n > 256 and per_flop * n**3 > budget_s / 2:
        n //= 2
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    linear = nn.Linear(n, n, bias=False, device="meta")
    linear.weight = nn.Parameter(b, requires_grad=False)
    kernels = {"torch": lambda: a @ b}
    if can_pack(linear):
        packed = PackedLinear(linear)  # a @ bᵀ: the same n x n x n product
        kernels["oneDNN"] = lambda: packed(a)
    best: tuple[float, str] = (0.0, "torch")
    for name, product in kernels.items():
        product()
        times: list[float] = []
        while len(times) < repeats and (len(times) < 2 or sum(times) < budget_s):
            times.append(seconds(product))
        best = max(best, (2 * n**3 / min(times) / 1e9, name))
    return best[0], n, best[1]


def describe(device: torch.device | str = "cpu", peaks: bool = True) -> dict[str, float]:
    """Print the machine (CPU model, features, threads, torch, ISA overrides) and, with
    ``peaks``, the fp32 and bf16 matmul peaks it measures now; returns the peaks."""
    device = torch.device(device)
    print(f"CPU: {cpu_model()} ({', '.join(cpu_features()) or 'no AVX2'}); {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__} "
          f"(kernels: {torch.backends.cpu.get_cpu_capability()})")
    forced = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
              if k in os.environ}
    if forced:
        print("forced: " + ", ".join(f"{k}={v}" for k, v in forced.items()))
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    if not peaks:
        return {}
    (fp32, n32, k32), (bf16, n16, k16) = matmul_peak(torch.float32, device), matmul_peak(torch.bfloat16, device)
    print(f"matmul peak: fp32 {fp32:.3g} GFLOP/s ({n32}^3, {k32}), bf16 {bf16:.3g} GFLOP/s ({n16}^3, {k16}) "
          f"(bf16/fp32 {bf16 / fp32:.2g}x)")
    return {"fp32": fp32, "bf16": bf16}
