"""What the server loads once and what every request goes through: ``Service``.

``Service`` holds the model, its tokenizer and decoding settings, and the ``Batcher``
whose threads own the model; it checks a request against the model (its languages)
and the limits (``Limits``), tokenizes, queues the sentences, and turns hypotheses
back into text. ``ApiError`` is a refusal, which the application sends as
``{"error": message}`` with its status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import transformer
from transformer.config import Config, to_dict
from transformer.serve.batcher import Batcher, Closed, Options

# Language codes a request may name, and what the page calls them.
LANGUAGE_NAMES = {"de": "German", "en": "English", "fr": "French", "cs": "Czech", "ids": "copy-task symbols"}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_chars: int = 5000  # characters of text per request, all sentences together
    max_sentences: int = 64  # sentences (items of q) per request
    max_body_bytes: int = 256 * 1024  # the request body
    max_beam_size: int = 16
    # /attention's sentence, in source tokens: its answer grows with the square of the length
    # (layers × heads × tokens² numbers for each kind).
    max_attention_tokens: int = 128


@dataclasses.dataclass(frozen=True)
class Batching:
    """How the batcher gathers and decodes (see ``Batcher``)."""

    workers: int = 1
    threads: int | None = None  # torch threads of each decoding thread
    wait_ms: float = 10.0  # how long a request may wait for others to join its batch
    continuous: bool = True  # greedy sentences join and leave the rows being decoded at every step


def _streamed(options: Options) -> bool:
    """Whether a job goes to a ``GreedyStream``: greedy, one hypothesis, no scores."""
    return options.beam_size == 1 and options.nbest == 1 and not options.scores


class ApiError(Exception):
    """A request the server refuses; becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Service:
    """A loaded model and everything the requests need of it.

    Args:
        translator: decodes (its ``cfg`` gives the default decoding; its ``workers``
            are not used: the batcher's threads decode one batch each).
        cfg: the checkpoint's config (``/info`` shows it; the languages come from it).
    """

    def __init__(self, translator, cfg: Config, checkpoint: str, limits: Limits = Limits(),
                 batching: Batching = Batching()):
        self.translator = translator
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.limits = limits
        self.batching = batching
        self.task = cfg.data.task
        # A translation model translates data.src_lang -> data.tgt_lang; the copy task's
        # "language" is its symbols, on both sides.
        if self.task == "translation":
            self.source, self.target = cfg.data.src_lang, cfg.data.tgt_lang
        else:
            self.source = self.target = "ids"
        self.started = time.time()
        self._translators: dict[int, Any] = {}
        self._lock = threading.Lock()
        # A batch is bounded as translate.py bounds one (decode.batch_tokens, batch_size).
        # Greedy requests without scores stream through this package's decoder
        # (``GreedyStream``); CTranslate2 batches them itself.
        continuous = batching.continuous and translator.model is not None
        self.batcher = Batcher(
            self._decode, workers=batching.workers, threads=batching.threads, wait=batching.wait_ms / 1000,
            batch_tokens=translator.cfg.batch_tokens, batch_size=translator.cfg.batch_size,
            stream=translator.stream if continuous else None, streams=_streamed,
        )

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "auto", limits: Limits = Limits(),
             batching: Batching = Batching(), **decode_overrides) -> "Service":
        """Load a checkpoint (or a folder exported to CTranslate2, decoded by it) once;
        ``decode_overrides`` replace fields of its decode config."""
        from transformer.inference.ctranslate2 import CTranslate2Translator, is_exported_model
        from transformer.inference.translator import Translator
        from transformer.runtime import resolve_device
        from transformer.training.checkpoint import load_model

        if is_exported_model(checkpoint):
            # The batcher's threads call it at once: as many CTranslate2 workers, a core each.
            translator = CTranslate2Translator.from_directory(
                checkpoint, device, workers=batching.workers, threads=batching.workers * (batching.threads or 1),
                **decode_overrides)
            cfg, decode = translator.config, translator.cfg
        else:
            dev = resolve_device(device)
            model, tokenizer, cfg = load_model(checkpoint, dev)
            decode = dataclasses.replace(cfg.decode, **decode_overrides, workers=1)
            # Unpacked (nn.Linear's products): packing for oneDNN made no difference to the
            # few-row steps of streams, and oneDNN keeps a kernel for every new shape, so
            # the server's memory grew with the variety of requests (docs/serving.md).
            translator = Translator(model, tokenizer, decode, dev, packed=False)
        if decode.beam_size > limits.max_beam_size:
            raise ValueError(f"the default beam size ({decode.beam_size}) is over --max-beam-size "
                             f"({limits.max_beam_size})")
        return cls(translator, cfg, str(checkpoint), limits, batching)

    def close(self) -> None:
        self.batcher.close()

    # -- decoding (in the batcher's threads) -------------------------------------------

    def translator_for(self, beam_size: int):
        """The translator decoding with ``beam_size`` (one per beam size, sharing the model)."""
        from transformer.inference.translator import Translator

        base = self.translator
        if beam_size == base.cfg.beam_size:
            return base
        with self._lock:
            if beam_size not in self._translators:
                if base.model is None:  # CTranslate2: the same loaded model, decoding otherwise
                    self._translators[beam_size] = base.with_decoding(beam_size=beam_size)
                else:
                    cfg = dataclasses.replace(base.cfg, beam_size=beam_size)
                    self._translators[beam_size] = Translator(base.model, base.tokenizer, cfg, base.device,
                                                              packed=False)
            return self._translators[beam_size]

    def _decode(self, options: Options, sources: list[list[int]]):
        import torch

        with torch.inference_mode():  # a little less work per operation than no_grad; the same outputs
            return self.translator_for(options.beam_size).search(sources, nbest=options.nbest, scores=options.scores)

    # -- requests (in the event loop) ----------------------------------------------------

    def check_languages(self, source: str | None, target: str | None) -> None:
        """Refuse a language pair the model does not translate ("auto" is its source)."""
        src = self.source if source in (None, "auto") else source
        tgt = self.target if target is None else target
        if (src, tgt) != (self.source, self.target):
            what = " (the copy task's symbols)" if self.task == "copy" else ""
            raise ApiError(422, f"this model translates {self.source} -> {self.target} only{what}, not {src} -> {tgt}")

    def check_texts(self, texts: str | list[str]) -> list[str]:
        """The sentences of ``q``; refuses empty ones and more than the limits allow,
        naming the sentence."""
        many = isinstance(texts, list)
        texts = texts if many else [texts]
        if not texts:
            raise ApiError(422, "'q' is an empty list: give at least one sentence")
        if len(texts) > self.limits.max_sentences:
            raise ApiError(413, f"'q' has {len(texts)} sentences; the limit is {self.limits.max_sentences} "
                           "per request")
        for i, text in enumerate(texts):
            if not text.strip():
                raise ApiError(422, f"'{f'q[{i}]' if many else 'q'}' is empty: there is nothing to translate")
        chars = sum(len(t) for t in texts)
        if chars > self.limits.max_chars:
            raise ApiError(413, f"'q' has {chars} characters; the limit is {self.limits.max_chars} per request")
        return texts

    def beam(self, beam_size: int | None, alternatives: int) -> tuple[int, int]:
        """The beam size and n-best of a request: ``alternatives`` more than the best need
        a beam that wide (the default beam is widened to hold them; an explicit one must)."""
        nbest, given = alternatives + 1, beam_size is not None
        if not given:
            beam_size = max(self.translator.cfg.beam_size, nbest)
        elif nbest > beam_size:
            raise ApiError(422, f"'alternatives' ({alternatives}) needs a 'beam_size' of at least {nbest}, "
                           f"got {beam_size}")
        if beam_size > self.limits.max_beam_size:
            what = "'beam_size'" if given else "'alternatives' + 1"
            raise ApiError(422, f"{what} ({beam_size}) is over this server's limit of {self.limits.max_beam_size}")
        return beam_size, nbest

    def encode(self, texts: list[str]) -> list[list[int]]:
        try:
            return self.translator.encode(texts)
        except ValueError as e:  # the copy task's tokenizer takes its symbols only
            raise ApiError(422, f"'q': {e}") from None

    async def _wait(self, future) -> Any:
        return await asyncio.wrap_future(future)

    def _submit(self, sources: list[list[int]], options: Options):
        try:
            return self.batcher.submit(sources, options)
        except Closed as e:
            raise ApiError(503, str(e)) from None

    async def translate(self, texts: list[str], beam_size: int, nbest: int) -> list[list[tuple[str, float]]]:
        """The ``nbest`` best translations of each text, with their scores, best first."""
        sources = self.encode(texts)
        found = await self._wait(self._submit(sources, Options(beam_size, nbest)))
        return [[(self.translator.detokenize(h.tokens), h.score) for h in hyps] for hyps in found]

    async def attention(self, text: str, beam_size: int) -> bytes:
        """The JSON of ``AttentionResponse`` for one sentence (built in a decoding thread:
        tens of thousands of numbers)."""
        from transformer.figures.attention import attention_maps

        if self.translator.model is None:
            raise ApiError(422, "/attention needs the model's own decoder: serve the checkpoint (.pt), not the "
                           "CTranslate2 export")
        (src,) = self.encode([text])
        if len(src) > self.limits.max_attention_tokens:
            raise ApiError(413, f"'q' has {len(src)} tokens; /attention takes sentences of at most "
                           f"{self.limits.max_attention_tokens}")
        (hyps,) = await self._wait(self._submit([src], Options(beam_size)))
        tok = self.translator.tokenizer
        tgt = [tok.bos_id, *hyps[0].tokens]

        def maps() -> bytes:
            weights = attention_maps(self.translator.model, src, tgt, tok.pad_id)
            body = {
                "translatedText": self.translator.detokenize(hyps[0].tokens),
                "source_tokens": tok.pieces(src, "src"),
                "target_tokens": tok.pieces(tgt, "tgt"),
                "layers": len(self.translator.model.encoder.layers),
                "heads": self.translator.model.encoder.layers[0].self_attn.h,
                # Four decimals: enough for any picture, and a third of the digits.
                **{kind: w.double().mul(1e4).round().div(1e4).tolist() for kind, w in weights.items()},
            }
            return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

        try:
            return await self._wait(self.batcher.call(maps))
        except Closed as e:
            raise ApiError(503, str(e)) from None

    def info(self) -> dict[str, Any]:
        model, tok, cfg = self.translator.model, self.translator.tokenizer, self.translator.cfg
        m = self.cfg.model
        if model is None:  # CTranslate2
            weights = {"engine": "ctranslate2", "dtype": self.translator.compute_type,
                       "max_positions": m.max_len, "device": self.translator.device}
        else:
            weights = {"engine": "torch", "parameters": sum(p.numel() for p in model.parameters()),
                       "max_positions": model.max_positions,
                       "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                       "device": str(self.translator.device)}
        return {
            "task": self.task,
            "source": self.source,
            "target": self.target,
            "languages": self.languages(),
            "model": {
                "layers": m.N, "d_model": m.d_model, "d_ff": m.d_ff, "heads": m.h, "norm": m.norm,
                "tokenizer": tok.kind, "src_vocab": tok.src_vocab_size, "tgt_vocab": tok.tgt_vocab_size,
                **weights,
            },
            "decoding": {
                "beam_size": cfg.beam_size, "length_penalty": cfg.length_penalty,
                "max_len_a": cfg.max_len_a, "max_len_b": cfg.max_len_b, "cache": cfg.cache,
            },
            "limits": dataclasses.asdict(self.limits),
            "batching": {**dataclasses.asdict(self.batching), "batch_tokens": cfg.batch_tokens,
                         "batch_size": cfg.batch_size},
            "checkpoint": {"path": self.checkpoint, "config": to_dict(self.cfg)},
            "version": transformer.__version__,
        }

    def languages(self) -> list[dict[str, Any]]:
        return [{"code": self.source, "name": LANGUAGE_NAMES.get(self.source, self.source), "targets": [self.target]}]
