"""Typed configuration: frozen dataclasses, YAML files and dotted overrides.

The dataclasses below are the single source of defaults. A YAML file in ``configs/`` maps onto
them one to one; ``--set train.warmup=400`` overrides one field and is coerced to that field's
type. An unknown key or a value of the wrong type is a ``ConfigError`` naming the key and source.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    """The network (``make_model``'s arguments)."""

    N: int = 6  # layers in the encoder and in the decoder
    d_model: int = 512
    d_ff: int = 2048
    h: int = 8  # attention heads
    dropout: float = 0.1
    norm: Literal["pre", "post"] = "pre"  # pre-norm (the reference) or post-norm (the paper)
    attention: Literal["sdpa", "explicit"] = "sdpa"
    tie_embeddings: bool = False  # one matrix for source, target and generator; needs a shared vocabulary
    max_len: int = 1024  # longest sequence the positional table covers


@dataclass(frozen=True)
class CopyTaskConfig:
    """The article's synthetic task: copy a random sequence of symbols."""

    vocab_size: int = 11  # padding (0) and symbols 1..vocab_size-1; 1 doubles as <s>
    min_len: int = 10  # sequence lengths are drawn from [min_len, seq_len]
    seq_len: int = 10
    batch_size: int = 80  # sequences per batch
    train_batches: int = 20  # batches per epoch
    valid_batches: int = 5


@dataclass(frozen=True)
class DataConfig:
    """What to train on: a parallel corpus (Multi30k by default) or the copy task."""

    task: Literal["translation", "copy"] = "translation"
    dir: str | None = None  # where Multi30k is: this folder; else $TRANSFORMER_DATA/multi30k; else data/multi30k
    download: bool = True  # fetch missing Multi30k files (checked against their sha256)
    # Your own corpus instead of Multi30k's: [source file, target file], plain or .gz.
    train: tuple[str, str] | None = None
    valid: tuple[str, str] | None = None
    test: tuple[str, str] | None = None
    src_lang: str = "de"
    tgt_lang: str = "en"
    tokenizer: Literal["sentencepiece", "spacy"] = "sentencepiece"  # joint subwords, or spaCy words
    vocab_size: int = 8000  # SentencePiece model size
    sp_model_type: Literal["unigram", "bpe"] = "unigram"
    sp_alpha: float = 0.0  # >0: sample each epoch's unigram subwords with this alpha (data/sampling.py); 0: off
    min_freq: int = 2  # spaCy word vocabularies keep words seen at least this often
    max_len: int = 100  # training pairs with more tokens (specials aside) on either side are dropped
    # The prepared corpus (token ids on disk, made on first use and reused while its files
    # and these settings stay the same); default: a folder per corpus under data/prepared.
    prepared: str | None = None
    tokenizer_sample: int = 500_000  # training pairs the tokenizer learns from (a seeded sample); 0: all
    prepare_workers: int | None = None  # processes encoding the corpus; None: one per core
    batch_tokens: int = 4096  # padded tokens per batch (sentences × longest, either side)
    workers: int = 0  # DataLoader worker processes building batches
    copy: CopyTaskConfig = field(default_factory=CopyTaskConfig)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation and the run."""

    seed: int = 1234
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    # bf16/fp16: autocast (fp16 on CUDA only); bf16-weights: a bf16 copy of the model with fp32 master weights
    amp: Literal["none", "bf16", "fp16", "bf16-weights"] = "none"
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps
    max_minutes: float | None = None  # stop after this much training time (wall clock)
    accum_steps: int = 1  # micro-batches per optimizer step (gradients are token-averaged)
    compile: bool = False  # torch.compile the forward pass (dynamic shapes); slower than eager on 2-core CPUs
    clip_grad_norm: float | None = None
    label_smoothing: float = 0.1
    lr_factor: float = 1.0  # the Noam schedule's factor
    warmup: int = 4000  # optimizer steps to the schedule's peak
    # The last fraction of the run (train.max_steps or max_minutes, whichever ends it) over which the rate falls
    # linearly to 0; 0: the Noam schedule alone. By max_minutes it follows the clock, so runs differ at the end.
    cooldown: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    log_every: int = 10  # refresh the progress bar's figures every N steps
    eval_every: int | None = None  # validate every N steps; None: after every epoch
    # What "better" means for best.pt and train.patience: the task's greedy score (BLEU), or the validation loss
    best_metric: Literal["score", "loss"] = "score"
    patience: int | None = None  # stop after this many validations without a better one
    keep_checkpoints: int = 0  # also keep the last N evaluation points as step-<N>.pt (for averaging)
    # At the end, best.pt keeps whichever of these length penalties gives the best beam-search
    # BLEU on the validation text (then used on the test text); empty: decode.length_penalty.
    tune_length_penalty: tuple[float, ...] = ()
    run_dir: str | None = None  # default: a new folder under runs_root
    runs_root: str = "runs"


@dataclass(frozen=True)
class DecodeConfig:
    """Decoding (translation)."""

    beam_size: int = 5  # 1: greedy decoding
    length_penalty: float = 1.0  # GNMT's alpha: rank by log-prob / ((5 + length) / 6) ** alpha
    nbest: int = 1  # hypotheses kept per sentence (at most beam_size)
    max_len_a: float = 1.5  # generate at most a·source_length + b tokens
    max_len_b: int = 10
    batch_size: int = 256  # sentences decoded together, at most
    batch_tokens: int = 8192  # source tokens (padding included) decoded together, at most
    batch_hypotheses: int | None = None  # beam: sentences x beam_size at once, at most; None: 640 on a CPU, else any
    # Beam search stops a sentence when no live prefix can beat its nbest-th finished hypothesis; with a
    # patience p, once its best extension has ended and it has round(beam_size·p) finished (CTranslate2's rule).
    patience: float | None = None
    cache: bool = True  # False: recompute the whole prefix at every step, as the reference
    # Weights and activations while decoding; None keeps the model's own (float32 after training).
    dtype: Literal["fp32", "bf16", "fp16"] | None = None  # bf16: faster with bf16 matmul units; fp16 needs CUDA
    workers: int | None = None  # batches decoded at once, in threads; None: 2 on a CPU with 2+ threads, else 1


@dataclass(frozen=True)
class FinetuneConfig:
    """Starting from a trained model (``train.py --init-from CKPT``)."""

    init_from: str | None = None  # checkpoint whose weights, tokenizer and vocabulary to start from
    keep_optimizer: bool = False  # continue its Adam state and schedule; else both start afresh
    freeze_embeddings: bool = False  # keep the embeddings (and a tied output layer) as they are
    freeze_encoder: bool = False  # keep the encoder's layers as they are


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def check_nbest(nbest: int, beam_size: int, patience: float | None = None) -> None:
    """An n-best list holds at most one hypothesis per beam (the one check of this rule),
    and at most the round(beam_size · patience) that a patient search collects."""
    if not 1 <= nbest <= beam_size:
        raise ConfigError(f"nbest ({nbest}) must be between 1 and the beam size ({beam_size})")
    if patience is not None and beam_size > 1 and nbest > round(beam_size * patience):
        raise ConfigError(f"nbest ({nbest}) must be at most beam size x patience ({beam_size} x {patience:g}, "
                          f"rounded: {round(beam_size * patience)})")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where that is lossless."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping of its fields, got {value!r}")
        return _build(tp, value, key)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{key}' has an invalid value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"'{key}' must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if args[-1] is Ellipsis:  # tuple[float, ...]: a list of any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"'{key}' must be a list, got {value!r}")
            args = (args[0],) * len(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"'{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-9 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for '{key}'")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            known = [f"{prefix}.{n}" if prefix else n for n in names]
            raise ConfigError(f"unknown key '{full}'{_suggest(full, known)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    """Constraints between fields, each reported under the key to change."""
    m, t, d = cfg.model, cfg.train, cfg.data
    positive = {
        "model.N": m.N, "model.d_model": m.d_model, "model.d_ff": m.d_ff, "model.h": m.h,
        "model.max_len": m.max_len, "train.accum_steps": t.accum_steps, "train.warmup": t.warmup,
        "train.epochs": t.epochs, "train.log_every": t.log_every, "decode.batch_size": cfg.decode.batch_size,
        "decode.beam_size": cfg.decode.beam_size, "decode.nbest": cfg.decode.nbest,
        "decode.batch_tokens": cfg.decode.batch_tokens,
        "data.vocab_size": cfg.data.vocab_size, "data.min_freq": cfg.data.min_freq, "data.max_len": cfg.data.max_len,
        "data.batch_tokens": cfg.data.batch_tokens,
    }
    optional = {"train.max_steps": t.max_steps, "train.eval_every": t.eval_every, "train.patience": t.patience,
                "train.max_minutes": t.max_minutes, "decode.workers": cfg.decode.workers,
                "decode.batch_hypotheses": cfg.decode.batch_hypotheses, "decode.patience": cfg.decode.patience}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"'{key}' must be at least 1, got {value}")
    if m.d_model % m.h:
        raise ConfigError(f"'model.h' ({m.h}) must divide model.d_model ({m.d_model})")
    if m.d_model % 2:
        raise ConfigError(f"'model.d_model' must be even for sinusoidal positions, got {m.d_model}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"'model.dropout' must be in [0, 1), got {m.dropout}")
    if not 0.0 <= t.cooldown <= 1.0:
        raise ConfigError(f"'train.cooldown' must be in [0, 1], got {t.cooldown}")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError(f"'train.label_smoothing' must be in [0, 1), got {t.label_smoothing}")
    for key, value in optional.items():
        if value is not None and value <= 0:
            raise ConfigError(f"'{key}' must be positive (or null), got {value}")
    try:
        check_nbest(cfg.decode.nbest, cfg.decode.beam_size, cfg.decode.patience)
    except ConfigError as e:
        raise ConfigError(f"'decode.nbest': {e}") from None
    for key, value in {"train.keep_checkpoints": t.keep_checkpoints, "data.tokenizer_sample": d.tokenizer_sample,
                       "data.workers": d.workers, "data.sp_alpha": d.sp_alpha}.items():
        if value < 0:
            raise ConfigError(f"'{key}' must be 0 or more, got {value}")
    if cfg.data.prepare_workers is not None and cfg.data.prepare_workers < 1:
        raise ConfigError(f"'data.prepare_workers' must be at least 1 (or null), got {cfg.data.prepare_workers}")
    # A training sentence has up to data.max_len tokens plus <s> and </s>.
    if cfg.data.max_len + 2 > cfg.data.batch_tokens:
        raise ConfigError(
            f"'data.batch_tokens' ({cfg.data.batch_tokens}) must hold one sentence of data.max_len "
            f"({cfg.data.max_len}) tokens plus <s> and </s>"
        )
    if cfg.data.max_len + 2 > m.max_len:
        raise ConfigError(f"'data.max_len' ({cfg.data.max_len}) plus 2 must not exceed model.max_len ({m.max_len})")
    c = cfg.data.copy
    if c.vocab_size < 3:
        raise ConfigError(f"'data.copy.vocab_size' must be at least 3, got {c.vocab_size}")
    if not 1 <= c.min_len <= c.seq_len:
        raise ConfigError(f"'data.copy.min_len' must be in [1, data.copy.seq_len], got {c.min_len}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"train.warmup=400"`` into (["train", "warmup"], 400); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text, and let the field's type judge it
    return key.strip().split("."), value


def _apply(data: dict, path: list[str], value: Any, source: str) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(path[: i + 1])}' is not a section")
        node = child
    node[path[-1]] = value


def _string_fields(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of the fields whose type admits a string (to keep "2024" a string)."""
    out = set()
    for f in dataclasses.fields(cls):
        tp = get_type_hints(cls)[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out |= _string_fields(tp, name + ".")
        elif tp is str or str in get_args(tp):
            out.add(name)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read a YAML file and apply dotted overrides.

    The file's values are laid over ``base`` (a config as ``to_dict`` gives it, or a
    part of one) when given, else over the defaults; with no file, ``base`` alone is used.

    Raises:
        ConfigError: naming the file or override, and the key at fault.
    """
    data: dict = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        if base is not None:
            data = _merged(copy.deepcopy(base), data)
        try:
            _check(_build(Config, data))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    strings = _string_fields(Config)
    for text in overrides:
        keys, value = parse_override(text)
        if ".".join(keys) in strings and not isinstance(value, str) and value is not None:
            value = text.partition("=")[2].strip()  # run_dir=2024 means the folder "2024"
        _apply(data, keys, value, f"--set {text}")
        try:
            _check(_build(Config, data))
        except ConfigError as e:
            raise ConfigError(f"--set {text}: {e}") from None
    return _build(Config, data)


def _merged(base: dict, top: dict) -> dict:
    """``base`` with ``top``'s values laid over it, section by section."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merged(base[key], value)
        else:
            base[key] = value
    return base


def to_dict(cfg: Any) -> dict:
    """A plain dict (lists, not tuples: JSON has no tuples) for YAML files and checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(data: dict) -> Config:
    """Rebuild a ``Config`` from ``to_dict``'s output (e.g. from a checkpoint)."""
    cfg = _build(Config, data)
    _check(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
