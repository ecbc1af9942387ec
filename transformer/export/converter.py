"""A checkpoint of this project as a CTranslate2 model directory.

``export_checkpoint(CKPT, OUT_DIR)`` builds the model through CTranslate2's own spec
API (``ctranslate2.specs.TransformerSpec``, filled in by ``TransformerConverter``, a
``ctranslate2.converters.Converter``) and writes, in OUT_DIR:

* ``model.bin``, ``config.json`` and the vocabulary files: CTranslate2's model;
* ``sentencepiece.model`` (SentencePiece models only): the tokenizer;
* ``transformer.json``: how text becomes tokens and back, the decoding defaults, the
  checkpoint's config; ``transformer.inference.ctranslate2`` reads it;
* ``README.md``: the same in words, for someone using the folder without this package.

What has to be right, checked against CTranslate2's source (``src/layers/common.cc``,
``src/layers/transformer.cc``, ``python/ctranslate2/specs``):

* Its built-in sinusoidal table is ``[sin | cos]``, with the frequencies
  ``10000^(-i/(d/2-1))``, and starts at position 1; ours interleaves sin and cos,
  uses ``10000^(-2i/d)`` and starts at 0. So our table (``sinusoid_table``) is given
  explicitly, for as many positions as the checkpoint's; the encoder's and decoder's
  copies become one aliased variable.
* Embeddings are multiplied by √d_model before the positions are added
  (``scale_embeddings``), as ``Embeddings`` does.
* Pre-norm blocks with a final norm on each stack, or post-norm blocks without one:
  ``pre_norm`` and the final ``layer_norm`` follow the checkpoint.
* Fused projections: self-attention's Q, K, V in one matrix (that order, rows
  concatenated); encoder-decoder attention's Q alone, then K and V fused.
* LayerNorm's epsilon (one value for the whole model in CTranslate2: a model whose
  norms differ is refused), biases everywhere including the generator's.
* Tied embeddings: the three matrices are written once (CTranslate2 aliases equal
  variables).
* Special tokens: ``<s>`` starts the decoder, ``</s>`` ends it, and sources get
  ``</s>`` appended (``add_source_eos``), as ``encode_src`` does. The copy task has no
  end symbol: its end token is the padding, which decoding never emits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer.config import Config, to_dict
from transformer.data.tokenizers import Tokenizer
from transformer.data.vocab import SPECIALS
from transformer.export.readme import SENTENCEPIECE_FILE, readme
from transformer.model.architecture import (
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderDecoder,
    EncoderLayer,
    PositionwiseFeedForward,
    SublayerConnection,
    sinusoid_table,
)
from transformer.model.attention import MultiHeadedAttention
from transformer.training.checkpoint import CheckpointError, load_checkpoint, load_model

log = logging.getLogger(__name__)

# What ``--quantization`` accepts -> CTranslate2's name for it.
QUANTIZATIONS = {"float32": "float32", "int8": "int8", "int8_float32": "int8_float32", "bf16": "bfloat16"}
METADATA = "transformer.json"  # our description of the folder, beside CTranslate2's files
FORMAT = "annotated-transformer/ctranslate2"
FORMAT_VERSION = 1
PAD_TOKEN = SPECIALS[0]


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported, or a folder that cannot be written; the
    message says which and why."""


def require_ctranslate2():
    """The ``ctranslate2`` module, or an ``ExportError`` saying how to install it."""
    try:
        import ctranslate2
    except ImportError as e:
        raise ExportError(
            f"exporting needs the ctranslate2 package ({e}): pip install -e \".[export]\""
        ) from None
    return ctranslate2


@dataclass(frozen=True)
class Vocabularies:
    """The token strings of each id, and the special tokens, as CTranslate2 sees them."""

    source: list[str]
    target: list[str]
    bos: str  # the decoder's first token
    eos: str  # ends decoding (the copy task: padding, never emitted)
    unk: str  # must be in the vocabulary, or CTranslate2 appends one
    add_source_eos: bool


def vocabularies(tokenizer: Tokenizer) -> Vocabularies:
    """One string per id, for each side, so that CTranslate2's token ids are ours.

    SentencePiece: its pieces (one vocabulary for both sides). spaCy: the two word
    vocabularies. The copy task: ``<pad>`` then the symbols as digits, symbol 1 (also the
    start symbol, as in training) being ``<s>`` on the target side.
    """
    kind = tokenizer.kind
    if kind == "sentencepiece":
        pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.src_vocab_size)]
        src = tgt = pieces
    elif kind == "spacy":
        src, tgt = list(tokenizer.src_vocab.itos), list(tokenizer.tgt_vocab.itos)
    elif kind == "ids":
        # Symbol 1 is also the start symbol: "<s>" on the target side. Not on the source
        # side, where CTranslate2 takes a source of only "<s>" or "</s>" for an empty one.
        src = [PAD_TOKEN] + [str(i) for i in range(1, tokenizer.src_vocab_size)]
        tgt = [PAD_TOKEN, SPECIALS[1]] + src[2:]
    else:
        raise ExportError(f"no export for the {kind!r} tokenizer")
    for side, tokens in (("source", src), ("target", tgt)):
        if len(set(tokens)) != len(tokens):
            raise ExportError(f"the {side} vocabulary holds a token twice: CTranslate2 maps tokens to ids "
                              "by their text")
    if kind == "ids":
        return Vocabularies(src, tgt, bos=tgt[tokenizer.bos_id], eos=PAD_TOKEN, unk=PAD_TOKEN, add_source_eos=False)
    return Vocabularies(src, tgt, bos=tgt[tokenizer.bos_id], eos=tgt[tokenizer.eos_id], unk=tgt[tokenizer.unk_id],
                        add_source_eos=True)


def check_representable(model: EncoderDecoder) -> float:
    """Check that CTranslate2's ``TransformerSpec`` can hold ``model`` exactly; returns
    the LayerNorm epsilon.

    Raises:
        ExportError: listing every part it cannot represent.
    """
    reasons: list[str] = []
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    for name, m in norms.items():
        if not m.elementwise_affine or m.bias is None:
            reasons.append(f"{name} is a LayerNorm without its scale or bias")
        if len(m.normalized_shape) != 1:
            reasons.append(f"{name} normalises over {tuple(m.normalized_shape)}, not the last dimension")
    eps = {m.eps for m in norms.values()}
    if len(eps) > 1:
        reasons.append(f"its LayerNorms use different epsilons ({sorted(eps)}); CTranslate2 has one for the model")
    for stack_name, stack, kinds in (("encoder", model.encoder, (Encoder, EncoderLayer)),
                                     ("decoder", model.decoder, (Decoder, DecoderLayer))):
        if type(stack) is not kinds[0]:
            reasons.append(f"{stack_name} is a {type(stack).__name__}, not a {kinds[0].__name__}")
            continue
        pre = {layer.sublayer[0].pre_norm for layer in stack.layers}
        if len(pre) > 1:
            reasons.append(f"{stack_name} mixes pre-norm and post-norm layers")
        final = isinstance(stack.norm, nn.LayerNorm)
        if pre == {True} and not final:
            reasons.append(f"{stack_name} is pre-norm without a final norm")
        if pre == {False} and final:
            reasons.append(f"{stack_name} is post-norm with a final norm on top")
        for i, layer in enumerate(stack.layers):
            where = f"{stack_name}.layers.{i}"
            if type(layer) is not kinds[1]:
                reasons.append(f"{where} is a {type(layer).__name__}, not a {kinds[1].__name__}")
                continue
            if not all(type(s) is SublayerConnection for s in layer.sublayer):
                reasons.append(f"{where} has residual blocks other than SublayerConnection")
            if type(layer.feed_forward) is not PositionwiseFeedForward:
                reasons.append(f"{where}.feed_forward is a {type(layer.feed_forward).__name__}")
            attentions = [layer.self_attn] + ([layer.src_attn] if isinstance(layer, DecoderLayer) else [])
            for attn in attentions:
                if type(attn) is not MultiHeadedAttention:
                    reasons.append(f"{where} has attention of type {type(attn).__name__}")
    heads = {m.h for m in model.modules() if isinstance(m, MultiHeadedAttention)}
    if len(heads) > 1:
        reasons.append(f"its attention layers have different numbers of heads ({sorted(heads)})")
    table = model.src_embed[1].pe[0]
    expected = sinusoid_table(table.size(0), table.size(1)).to(table.device, table.dtype)
    for side in ("src_embed", "tgt_embed"):
        if not torch.equal(getattr(model, side)[1].pe[0], expected):
            reasons.append(f"{side}'s positional table is not sinusoid_table's")
    if reasons:
        raise ExportError("CTranslate2 cannot represent this model:\n  - " + "\n  - ".join(reasons))
    return next(iter(eps)) if eps else 1e-5


def _numpy(t: torch.Tensor):
    return t.detach().to("cpu", torch.float32).numpy()


def _linear(spec, linear: nn.Linear) -> None:
    spec.weight = _numpy(linear.weight)
    if linear.bias is not None:  # CTranslate2's bias is optional
        spec.bias = _numpy(linear.bias)


def _fused(spec, linears: list[nn.Linear]) -> None:
    """Several projections of one input as one matrix: their rows, in this order."""
    import numpy as np

    spec.weight = np.concatenate([_numpy(m.weight) for m in linears])
    if any(m.bias is not None for m in linears):
        spec.bias = np.concatenate([_numpy(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32)
                                    for m in linears])


def _norm(spec, norm: nn.LayerNorm) -> None:
    spec.gamma = _numpy(norm.weight)
    spec.beta = _numpy(norm.bias)


def _self_attention(spec, block: SublayerConnection, attn: MultiHeadedAttention) -> None:
    q, k, v, out = attn.linears
    _norm(spec.layer_norm, block.norm)
    _fused(spec.linear[0], [q, k, v])
    _linear(spec.linear[1], out)


def _ffn(spec, block: SublayerConnection, ff: PositionwiseFeedForward) -> None:
    _norm(spec.layer_norm, block.norm)
    _linear(spec.linear_0, ff.w_1)
    _linear(spec.linear_1, ff.w_2)


def build_spec(model: EncoderDecoder, tokenizer: Tokenizer):
    """CTranslate2's ``TransformerSpec`` of ``model``, weights and vocabularies set.

    Raises:
        ExportError: for a model it cannot represent.
    """
    ctranslate2 = require_ctranslate2()
    from ctranslate2.specs import common_spec, transformer_spec

    eps = check_representable(model)
    vocab = vocabularies(tokenizer)
    layers, heads = len(model.encoder.layers), model.encoder.layers[0].self_attn.h
    pre_norm = model.encoder.layers[0].sublayer[0].pre_norm
    spec = transformer_spec.TransformerSpec.from_config(
        (layers, len(model.decoder.layers)), heads, pre_norm=pre_norm, activation=common_spec.Activation.RELU,
    )
    table = _numpy(sinusoid_table(model.max_positions, model.d_model))  # ours, not CTranslate2's built-in one
    for stack_spec, embed in ((spec.encoder, model.src_embed), (spec.decoder, model.tgt_embed)):
        stack_spec.scale_embeddings = True  # √d_model, before the positions are added
        stack_spec.position_encodings.encodings = table
    spec.encoder.embeddings[0].weight = _numpy(model.src_embed[0].lut.weight)
    spec.decoder.embeddings.weight = _numpy(model.tgt_embed[0].lut.weight)
    if pre_norm:
        _norm(spec.encoder.layer_norm, model.encoder.norm)
        _norm(spec.decoder.layer_norm, model.decoder.norm)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder.layers):
        _self_attention(layer_spec.self_attention, layer.sublayer[0], layer.self_attn)
        _ffn(layer_spec.ffn, layer.sublayer[1], layer.feed_forward)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder.layers):
        _self_attention(layer_spec.self_attention, layer.sublayer[0], layer.self_attn)
        q, k, v, out = layer.src_attn.linears
        _norm(layer_spec.attention.layer_norm, layer.sublayer[1].norm)
        _linear(layer_spec.attention.linear[0], q)
        _fused(layer_spec.attention.linear[1], [k, v])
        _linear(layer_spec.attention.linear[2], out)
        _ffn(layer_spec.ffn, layer.sublayer[2], layer.feed_forward)
    _linear(spec.decoder.projection, model.generator.proj)

    config = spec.config
    config.layer_norm_epsilon = float(eps)
    config.bos_token, config.eos_token, config.unk_token = vocab.bos, vocab.eos, vocab.unk
    config.decoder_start_token = vocab.bos
    config.add_source_bos, config.add_source_eos = False, vocab.add_source_eos
    spec.register_source_vocabulary(vocab.source)
    spec.register_target_vocabulary(vocab.target)
    log.debug("built a CTranslate2 %s spec with ctranslate2 %s", spec.name, ctranslate2.__version__)
    return spec


def _converter_class():
    """``TransformerConverter``, defined once ctranslate2 is importable."""
    ctranslate2 = require_ctranslate2()

    class TransformerConverter(ctranslate2.converters.Converter):
        """CTranslate2's converter interface over a model of this project."""

        def __init__(self, model: EncoderDecoder, tokenizer: Tokenizer):
            self.model, self.tokenizer = model, tokenizer

        def _load(self):
            return build_spec(self.model, self.tokenizer)

    return TransformerConverter


def metadata(tokenizer: Tokenizer, cfg: Config, model: EncoderDecoder, quantization: str,
             source: str | None, step: int | None) -> dict[str, Any]:
    """``transformer.json``: what ``CTranslate2Translator`` needs beside CTranslate2's files."""
    import ctranslate2

    vocab = vocabularies(tokenizer)
    if tokenizer.kind == "sentencepiece":
        tok = {"kind": "sentencepiece", "model_file": SENTENCEPIECE_FILE}
    else:
        tok = tokenizer.state_dict()  # plain values: the copy task's size, or spaCy's languages and words
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "exported_from": source,
        "step": step,
        "quantization": quantization,
        "ctranslate2_version": ctranslate2.__version__,
        "tokenizer": tok,
        "tokens": {"bos": vocab.bos, "eos": vocab.eos, "unk": vocab.unk, "pad": PAD_TOKEN,
                   "add_source_eos": vocab.add_source_eos, "has_eos": tokenizer.eos_id is not None},
        "max_positions": model.max_positions,
        "config": to_dict(cfg),
    }


def export_model(model: EncoderDecoder, tokenizer: Tokenizer, cfg: Config, out_dir: str | Path,
                 quantization: str = "float32", force: bool = False, source: str | None = None,
                 step: int | None = None) -> Path:
    """Write ``model`` as a CTranslate2 model directory ``out_dir`` (see the module's doc).

    The folder is built beside ``out_dir`` and renamed into place when complete, so an
    interrupted export leaves no half-written model under that name.

    Args:
        quantization: "float32", "int8", "int8_float32" or "bf16": the type of the weights.
        force: replace ``out_dir`` when it exists (else that is an error).

    Raises:
        ExportError: an existing ``out_dir``, an unknown quantization, or a model
            CTranslate2 cannot represent.
    """
    out_dir = Path(out_dir)
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantization!r} (choose from {', '.join(QUANTIZATIONS)})")
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} already exists: choose a new folder, or pass --force to replace it")
    if out_dir.exists() and not (out_dir / METADATA).is_file():
        raise ExportError(f"{out_dir} exists and is not an exported model: not replaced, even with --force")
    converter = _converter_class()(model.eval(), tokenizer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        built = staging / "model"
        try:
            converter.convert(str(built), quantization=QUANTIZATIONS[quantization])
        except ExportError:
            raise
        except (ValueError, NotImplementedError, RuntimeError) as e:  # CTranslate2's own checks
            raise ExportError(f"CTranslate2 refused the model: {e}") from e
        if tokenizer.kind == "sentencepiece":
            (built / SENTENCEPIECE_FILE).write_bytes(tokenizer.model)
        meta = metadata(tokenizer, cfg, model, quantization, source, step)
        (built / METADATA).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (built / "README.md").write_text(readme(meta), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(built, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, quantization: str = "float32",
                      force: bool = False) -> Path:
    """Export a checkpoint written by ``train.py`` (see ``export_model``).

    Raises:
        ExportError: for a file that is not a usable checkpoint, and as ``export_model``.
    """
    require_ctranslate2()
    path = Path(checkpoint)
    if path.is_dir():
        raise ExportError(f"{path} is a folder: give a checkpoint file written by train.py (RUN_DIR/best.pt)")
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise ExportError(f"{path}: not a checkpoint (train.py writes .pt files; this is not one)")
    try:
        state = load_checkpoint(checkpoint)
        model, tokenizer, cfg = load_model(checkpoint, "cpu")
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    return export_model(model, tokenizer, cfg, out_dir, quantization, force, source=str(checkpoint),
                        step=state.get("step"))
