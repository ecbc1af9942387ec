"""Translation on a parallel corpus (Multi30k by default): files, tokenizer, batches, BLEU."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from transformer.config import Config, ConfigError, DataConfig
from transformer.data.batching import Batch, BatchPlan, plan_batches, seeded_generator
from transformer.data.files import read_parallel
from transformer.data.multi30k import ensure_multi30k, resolve_data_dir, split_paths
from transformer.data.prepare import ensure_prepared
from transformer.data.prepared import Split
from transformer.data.sampling import Resegmenter
from transformer.data.tokenizers import Tokenizer
from transformer.inference.scoring import score
from transformer.inference.translator import Translator, decoding_name
from transformer.model.architecture import EncoderDecoder
from transformer.tasks import Score
from transformer.training.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def corpus_files(cfg: DataConfig) -> dict[str, tuple[Path, Path] | None]:
    """(source, target) files for train, valid and test: the user's, else Multi30k's."""
    given = {"train": cfg.train, "valid": cfg.valid, "test": cfg.test}
    if cfg.train is not None and cfg.valid is None:
        raise ConfigError("'data.valid' is needed with data.train: validation picks the best checkpoint")
    files: dict[str, tuple[Path, Path] | None] = {}
    multi30k_dir = None
    for split, pair in given.items():
        if pair is not None:
            files[split] = (Path(pair[0]), Path(pair[1]))
        elif cfg.train is not None and split == "test":
            files[split] = None  # the user's own corpus need not come with a test set
        else:
            if multi30k_dir is None:
                multi30k_dir = ensure_multi30k(resolve_data_dir(cfg.dir), download_missing=cfg.download)
            files[split] = split_paths(multi30k_dir, split, cfg.src_lang, cfg.tgt_lang)
    return files


class _Collated(Dataset):
    """Batch i of a plan over a prepared split, gathered from its files (in a DataLoader
    worker when there are any)."""

    def __init__(self, split: Split, plan: BatchPlan, start: int, pad: int):
        self.split, self.plan, self.start, self.pad = split, plan, start, pad

    def __len__(self) -> int:
        return len(self.plan) - self.start

    def __getitem__(self, i: int) -> Batch:
        return self.split.batch(self.plan[self.start + i], self.pad)


class TranslationTask:
    """Training and validation batches, and the raw text to score, for one corpus.

    The corpus is read through its prepared form (``transformer.data.prepare``): made on
    first use, then reused. The best model is the one with the best greedy BLEU on the
    validation text; at the end of a run, ``best.pt`` translates the test text.

    Args:
        cfg: the whole config (data section, and train.seed for the batch order).
        tokenizer: encode with this one (e.g. from a checkpoint); else the prepared
            corpus's, learned on a sample of the training split.
    """

    def __init__(self, cfg: Config, tokenizer: Tokenizer | None = None):
        self.cfg = cfg.data
        self.seed = cfg.train.seed
        kind = tokenizer.kind if tokenizer is not None else cfg.data.tokenizer
        if cfg.data.sp_alpha > 0 and (kind, cfg.data.sp_model_type) != ("sentencepiece", "unigram"):
            raise ConfigError(f"'data.sp_alpha' ({cfg.data.sp_alpha}) samples the subwords of a unigram SentencePiece "
                              f"model, and this one is {kind} ({cfg.data.sp_model_type}): set data.sp_alpha=0")
        # Length penalties to choose from at the end (only beam search has one).
        self.length_penalties = cfg.train.tune_length_penalty if cfg.decode.beam_size > 1 else ()
        files = corpus_files(cfg.data)
        self.corpus = ensure_prepared(cfg.data, files, tokenizer)
        self.tokenizer = self.corpus.tokenizer
        # The text itself is read for scoring only: validation and test sets are small.
        valid = read_parallel(*files["valid"])
        test = read_parallel(*files["test"]) if files["test"] is not None else []
        self.valid_src, self.valid_ref = [s for s, _ in valid], [t for _, t in valid]
        self.test_src, self.test_ref = [s for s, _ in test], [t for _, t in test]
        split = self.corpus.valid
        # The budget widened for validation sentences longer than it (never dropped).
        budget = max(self.cfg.batch_tokens, int(np.maximum(split.src_lengths, split.tgt_lengths).max(initial=0)))
        plan = plan_batches(split.src_lengths, split.tgt_lengths, budget)
        self._valid = list(_Lazy(_Collated(split, plan, 0, self.tokenizer.pad_id)))
        self._resegmenter = None
        if self.cfg.sp_alpha > 0:
            started = time.perf_counter()
            self._resegmenter = Resegmenter(self.tokenizer, self.corpus.train, self.cfg.sp_alpha, self.cfg.max_len)
            sampler = self._resegmenter
            log.info("subword sampling (data.sp_alpha %g): %s word occurrences of %s distinct words, numbered "
                     "and their lattices built in %.1f s", self.cfg.sp_alpha, f"{sampler.occurrences:,}",
                     f"{len(sampler.lattices.start):,}", time.perf_counter() - started)

    def train_batches(self, epoch: int, start: int = 0) -> Iterable[Batch]:
        """Epoch ``epoch``'s batches from batch ``start`` on: a fresh shuffle, reproducible
        from the seed and epoch (with ``data.sp_alpha`` also a fresh segmentation:
        ``transformer.data.sampling``). Only the batches used are gathered."""
        split = self.corpus.train if self._resegmenter is None else self._resegmenter.epoch(self.seed, epoch)
        plan = plan_batches(split.src_lengths, split.tgt_lengths, self.cfg.batch_tokens,
                            seeded_generator(self.seed, epoch + 1))
        dataset = _Collated(split, plan, start, self.tokenizer.pad_id)
        if self.cfg.workers == 0:
            return _Lazy(dataset)
        # Its own generator: a DataLoader otherwise draws its workers' seed from the
        # global one, whose stream (dropout) would then differ after a resume.
        return DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=self.cfg.workers, prefetch_factor=4,
            generator=seeded_generator(self.seed, -(epoch + 1)),
        )

    def valid_batches(self) -> list[Batch]:
        return self._valid

    def score(self, translator: Translator, valid_loss: float) -> Score:
        """Greedy BLEU and chrF on the validation text."""
        scores = score(translator.translate(self.valid_src), self.valid_ref)
        text = f"BLEU {scores.bleu:.2f}, chrF {scores.chrf:.2f} (greedy)"
        return Score(scores.bleu, {"bleu": scores.bleu, "chrf": scores.chrf}, text)

    def finish(self, model: EncoderDecoder, run_dir: Path, metrics, n_demo: int) -> list[tuple[str, str]]:
        """Choose ``best.pt``'s length penalty (``train.tune_length_penalty``), score it on
        the test set and write its translations beside it."""
        if not self.test_src and not self.length_penalties:
            return []
        device = str(next(model.parameters()).device)
        translator = Translator.from_checkpoint(run_dir / "best.pt", device=device)
        if self.length_penalties:
            self._tune_length_penalty(translator, run_dir / "best.pt", metrics)
        if not self.test_src:
            return []
        hypotheses = translator.translate(self.test_src)
        (run_dir / "test.hyp.txt").write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
        scores = score(hypotheses, self.test_ref)
        decoding = decoding_name(translator.cfg)
        metrics.write(kind="test", bleu=scores.bleu, chrf=scores.chrf, bleu_lc=scores.bleu_lc,
                      signature=scores.bleu_signature, decoding=decoding)
        log.info("test (best.pt, %s): %s", decoding, scores.summary())
        demo = list(zip(self.test_src[:n_demo], hypotheses[:n_demo]))
        for src, out in demo:
            log.info("decode: %s -> %s", src, out)
        return demo

    def _tune_length_penalty(self, translator: Translator, path: Path, metrics) -> None:
        """Decode the validation text with each length penalty of ``train.tune_length_penalty``
        and keep the one with the best BLEU (the first of equals), in ``translator`` and
        as the default decoding of the checkpoint at ``path``."""
        bleu = {}
        for alpha in self.length_penalties:
            translator.cfg = dataclasses.replace(translator.cfg, length_penalty=alpha)
            bleu[alpha] = score(translator.translate(self.valid_src), self.valid_ref).bleu
        best = max(self.length_penalties, key=bleu.__getitem__)
        translator.cfg = dataclasses.replace(translator.cfg, length_penalty=best)
        state = load_checkpoint(path)
        state["config"]["decode"]["length_penalty"] = best
        save_checkpoint(path, state)
        metrics.write(kind="length_penalty", chosen=best, beam_size=translator.cfg.beam_size,
                      valid_bleu=[[alpha, b] for alpha, b in bleu.items()])
        log.info("length penalty %g chosen for %s on validation (beam %d BLEU: %s)", best, path.name,
                 translator.cfg.beam_size, ", ".join(f"alpha {a:g} {b:.2f}" for a, b in bleu.items()))


class _Lazy:
    """A dataset iterated in order in this process: batches are built as they are used."""

    def __init__(self, dataset: _Collated):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        return (self.dataset[i] for i in range(len(self.dataset)))
