"""A parallel corpus (Multi30k by default) ready for training: files, tokenizer, batches."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from transformer.batching import Batch, collate, seeded_generator, token_batches
from transformer.config import Config, ConfigError, DataConfig
from transformer.data import ensure_multi30k, filter_training_pairs, read_parallel, resolve_data_dir, split_paths
from transformer.tokenize import SentencePieceTokenizer, SpacyTokenizer, Tokenizer

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


def build_tokenizer(cfg: DataConfig, pairs: list[tuple[str, str]]) -> Tokenizer:
    """Learn the tokenizer from the training pairs only."""
    try:
        if cfg.tokenizer == "sentencepiece":
            text = [s for s, _ in pairs] + [t for _, t in pairs]
            return SentencePieceTokenizer.train(text, vocab_size=cfg.vocab_size, model_type=cfg.sp_model_type)
        return SpacyTokenizer.build(pairs, min_freq=cfg.min_freq, src_lang=cfg.src_lang, tgt_lang=cfg.tgt_lang)
    except ValueError as e:  # a vocabulary size or language the corpus cannot serve
        raise ConfigError(f"'data.tokenizer' ({cfg.tokenizer}): {e}") from e


class _Collated(Dataset):
    """Batch i of an epoch's plan, collated (in a DataLoader worker when there are any)."""

    def __init__(self, src: list[list[int]], tgt: list[list[int]], plan: list[list[int]], pad: int):
        self.src, self.tgt, self.plan, self.pad = src, tgt, plan, pad

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Batch:
        index = self.plan[i]
        return collate([self.src[j] for j in index], [self.tgt[j] for j in index], self.pad)


class TranslationTask:
    """Training and validation batches, and the raw text to score, for one corpus.

    Args:
        cfg: the whole config (data section, and train.seed for the batch order).
        tokenizer: reuse this one (e.g. from a checkpoint); else learn one on the
            training split.
    """

    def __init__(self, cfg: Config, tokenizer: Tokenizer | None = None):
        self.cfg = cfg.data
        self.seed = cfg.train.seed
        files = corpus_files(cfg.data)
        train = read_parallel(*files["train"])
        valid = read_parallel(*files["valid"])
        test = read_parallel(*files["test"]) if files["test"] is not None else []
        log.info("corpus: %d training, %d validation, %d test pairs", len(train), len(valid), len(test))
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.data, train)
        tok = self.tokenizer
        src = [tok.encode_src(s) for s, _ in train]
        tgt = [tok.encode_tgt(t) for _, t in train]
        # Lengths without </s> on the source and <s> ... </s> on the target.
        keep, _ = filter_training_pairs([s[:-1] for s in src], [t[1:-1] for t in tgt], cfg.data.max_len)
        self.train_src = [src[i] for i in keep]
        self.train_tgt = [tgt[i] for i in keep]
        self.valid_src, self.valid_ref = [s for s, _ in valid], [t for _, t in valid]
        self.test_src, self.test_ref = [s for s, _ in test], [t for _, t in test]
        valid_src = [tok.encode_src(s) for s in self.valid_src]
        valid_tgt = [tok.encode_tgt(t) for t in self.valid_ref]
        plan = token_batches([len(s) for s in valid_src], [len(t) for t in valid_tgt], self._budget(valid_src, valid_tgt))
        self._valid = list(_Lazy(_Collated(valid_src, valid_tgt, plan, tok.pad_id)))

    def _budget(self, src: list[list[int]], tgt: list[list[int]]) -> int:
        """The batch budget, widened for validation sentences longer than it (never dropped)."""
        longest = max((max(len(s), len(t)) for s, t in zip(src, tgt)), default=0)
        return max(self.cfg.batch_tokens, longest)

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        """Epoch ``epoch``'s batches: a fresh shuffle, reproducible from the seed and epoch."""
        generator = seeded_generator(self.seed, epoch + 1)
        plan = token_batches(
            [len(s) for s in self.train_src], [len(t) for t in self.train_tgt], self.cfg.batch_tokens, generator
        )
        dataset = _Collated(self.train_src, self.train_tgt, plan, self.tokenizer.pad_id)
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


class _Lazy:
    """A dataset iterated in order in this process: batches are built as they are used."""

    def __init__(self, dataset: _Collated):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        return (self.dataset[i] for i in range(len(self.dataset)))
