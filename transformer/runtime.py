"""What training and translation share about where they run: devices, precision, logging."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from transformer.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# train.amp's autocast dtype; bf16-weights trains a bf16 copy, and autocasts where the fp32 model runs.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16-weights": torch.bfloat16}


def resolve_device(name: str, key: str = "'train.device'") -> torch.device:
    """"auto" picks CUDA when it is available, else the CPU; anything else is checked.
    ``key`` is where the name came from, for the error (a config key, an option)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"{key}: unknown device {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is {name!r} but CUDA is not available here")
    return device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: bf16 on CPU or CUDA, fp16 on CUDA only."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("'train.amp': fp16 needs a CUDA device; use bf16 on the CPU")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


# How every log line reads, on stderr and in train.log.
LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> logging.Handler | None:
    """Log to stderr, and also to ``log_file`` when given; returns that file's handler
    (remove it with ``logging.getLogger().removeHandler`` when the run ends)."""
    root = logging.getLogger()
    root.setLevel(level)
    fmt = LOG_FORMAT
    if not any(getattr(h, "_transformer_console", False) for h in root.handlers):
        console = logging.StreamHandler()
        console.setFormatter(fmt)
        console._transformer_console = True  # type: ignore[attr-defined]
        root.addHandler(console)
    if log_file is None:
        return None
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(fmt)
    root.addHandler(handler)
    return handler
