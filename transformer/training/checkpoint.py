"""Checkpoints: one self-describing file of plain tensors and Python values.

A checkpoint is a dict that ``torch.load(weights_only=True)`` reads without running
any code: the model's weights, the resolved config, the tokenizer's state, and the
training state. It is written atomically, so a crash during a save never leaves a
half-written file under the real name. Checkpoints of one model can be averaged
(``average_checkpoints``: the article's ``average()``, working).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from transformer.config import Config, ConfigError, ModelConfig, from_dict
from transformer.data.files import atomic_write
from transformer.data.tokenizers import Tokenizer, tokenizer_from_state
from transformer.model.architecture import EncoderDecoder, make_model

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "model", "tokenizer")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format version) to ``path`` atomically."""
    state = {"format_version": FORMAT_VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (no code runs) and check that it is one of ours.

    Raises:
        CheckpointError: naming the file, when it is missing, unreadable, not a
            checkpoint, incomplete, or of a newer format than this code knows.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path}: holds pickled Python objects, which are not loaded because loading them could run code"
            ) from e
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, corrupt or foreign file)") from e
    except Exception as e:  # a damaged file can fail anywhere inside the unpickler
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated, corrupt or foreign file: {type(e).__name__})"
        ) from e
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no format_version)")
    version = state["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version!r} is newer than this code reads ({FORMAT_VERSION}); upgrade the package"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return state


def build_model(cfg: ModelConfig, tokenizer: Tokenizer) -> EncoderDecoder:
    """``make_model`` with the sizes the tokenizer dictates."""
    if cfg.tie_embeddings and not tokenizer.shared_vocab:
        raise ConfigError(
            "'model.tie_embeddings' needs one vocabulary shared by source and target, "
            f"but the {tokenizer.kind} tokenizer keeps one per side"
        )
    return make_model(
        tokenizer.src_vocab_size,
        tokenizer.tgt_vocab_size,
        N=cfg.N,
        d_model=cfg.d_model,
        d_ff=cfg.d_ff,
        h=cfg.h,
        dropout=cfg.dropout,
        norm=cfg.norm,
        attention=cfg.attention,
        tie_embeddings=cfg.tie_embeddings,
        max_len=cfg.max_len,
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[EncoderDecoder, Tokenizer, Config]:
    """Rebuild the model, tokenizer and config stored in a checkpoint (eval mode)."""
    state = load_checkpoint(path)
    try:
        cfg = from_dict(state["config"])
        tokenizer = tokenizer_from_state(state["tokenizer"])
        model = build_model(cfg.model, tokenizer)
        model.load_state_dict(state["model"])
    except (ConfigError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: checkpoint does not describe a usable model ({e})") from e
    return model.to(device).eval(), tokenizer, cfg


STEP_FILE = re.compile(r"step-(\d+)\.pt")


def step_checkpoints(run_dir: Path) -> list[Path]:
    """A run's step-<N>.pt files (see ``train.keep_checkpoints``), oldest first."""
    found = sorted(
        (int(m.group(1)), p) for p in Path(run_dir).glob("step-*.pt") if (m := STEP_FILE.fullmatch(p.name))
    )
    return [p for _, p in found]


def run_checkpoints(run_dir: Path, last: int) -> list[Path]:
    """The newest ``last`` step-<N>.pt files of a run, oldest first."""
    found = step_checkpoints(run_dir)
    if len(found) < last:
        raise CheckpointError(
            f"{run_dir}: {len(found)} step-<N>.pt checkpoints, fewer than the {last} asked for "
            "(train.keep_checkpoints sets how many a run keeps)"
        )
    return found[-last:]


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """The state of the newest checkpoint, with its model weights replaced by the mean
    of all of them (floating-point tensors; others must be equal and are kept).

    Raises:
        CheckpointError: naming the file, for an unreadable checkpoint or one whose
            model (shapes, names, settings) or tokenizer differs from the first's.
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    first_path = Path(paths[0])
    first = load_checkpoint(first_path)
    total = {k: v.double() if v.is_floating_point() else v for k, v in first["model"].items()}
    newest = first
    for path in paths[1:]:
        state = load_checkpoint(path)
        if _shape_settings(state) != _shape_settings(first):
            raise CheckpointError(f"{path}: its model settings differ from those of {first_path}")
        if state["tokenizer"] != first["tokenizer"]:
            raise CheckpointError(f"{path}: its tokenizer or vocabulary differs from that of {first_path}")
        weights = state["model"]
        if weights.keys() != total.keys():
            raise CheckpointError(f"{path}: its parameters are not those of {first_path}")
        for name, value in weights.items():
            if value.shape != total[name].shape:
                raise CheckpointError(
                    f"{path}: parameter {name} has shape {tuple(value.shape)}, "
                    f"{tuple(total[name].shape)} in {first_path}"
                )
            if value.is_floating_point():
                total[name] += value.double()
            elif not torch.equal(value, total[name]):
                raise CheckpointError(f"{path}: {name} differs from {first_path} and cannot be averaged")
        newest = state
    model = {
        name: (value / len(paths)).to(first["model"][name].dtype) if value.is_floating_point() else value
        for name, value in total.items()
    }
    kept = ("config", "tokenizer", "step", "epoch")
    return {
        **{k: newest[k] for k in kept if k in newest},
        "model": model,
        "averaged_from": [str(p) for p in paths],
    }


def _shape_settings(state: dict[str, Any]) -> dict[str, Any]:
    """The model settings that make two checkpoints different models (dropout does not)."""
    return {k: v for k, v in state["config"].get("model", {}).items() if k != "dropout"}
