"""The Annotated Transformer (harvardnlp), as a small, tested translation toolkit.

The folders follow the data, from text to translations:

* ``data`` — corpora on disk (Multi30k's download), tokenizers, vocabularies, batches;
* ``tasks`` — what a run learns and how it is judged: the copy task, translation;
* ``model`` — the article's modules under its names, and the decoding cache;
* ``training`` — the loss, the schedule, the trainer and its callbacks, checkpoints,
  runs, several processes;
* ``inference`` — greedy and beam search, the ``Translator``, BLEU;
* ``figures`` — the article's figures and the attention maps;
* ``fast`` — the CPU speed work, each piece tested against the plain code it replaces.

The modules at the top are the configuration (``config``), where code runs
(``runtime``) and the commands (``cli`` for ``train.py`` and ``translate.py``,
``average``; ``python -m transformer.figures``). The article's names are importable
from here: ``from transformer import make_model, LabelSmoothing, greedy_decode``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Name -> the module that defines it; imported on first use, so that ``import
# transformer.config`` (and ``--help``) does not load torch.
_EXPORTS = {
    "make_model": "transformer.model.architecture",
    "EncoderDecoder": "transformer.model.architecture",
    "Encoder": "transformer.model.architecture",
    "Decoder": "transformer.model.architecture",
    "EncoderLayer": "transformer.model.architecture",
    "DecoderLayer": "transformer.model.architecture",
    "SublayerConnection": "transformer.model.architecture",
    "PositionwiseFeedForward": "transformer.model.architecture",
    "Embeddings": "transformer.model.architecture",
    "PositionalEncoding": "transformer.model.architecture",
    "Generator": "transformer.model.architecture",
    "clones": "transformer.model.architecture",
    "attention": "transformer.model.attention",
    "MultiHeadedAttention": "transformer.model.attention",
    "Batch": "transformer.data.batching",
    "subsequent_mask": "transformer.data.batching",
    "LabelSmoothing": "transformer.training.loss",
    "rate": "transformer.training.schedule",
    "Trainer": "transformer.training.trainer",
    "greedy_decode": "transformer.inference.search",
    "beam_search": "transformer.inference.search",
    "Translator": "transformer.inference.translator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'transformer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
