"""Translation on a parallel corpus (Multi30k by default): files, tokenizer, batches, BLEU."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from transformer.config import Config, ConfigError, DataConfig
from transformer.data.batching import Batch, collate, seeded_generator, token_batches
from transformer.data.files import read_parallel
from transformer.data.multi30k import ensure_multi30k, resolve_data_dir, split_paths
from transformer.data.tokenizers import Tokenizer, learn_tokenizer
from transformer.inference.scoring import score
from transformer.inference.translator import Translator, decoding_name
from transformer.model.architecture import EncoderDecoder
from transformer.tasks import Score

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


def filter_training_pairs(src: list[list[int]], tgt: list[list[int]], max_len: int) -> tuple[list[int], dict[str, int]]:
    """Indices of the training pairs to keep: neither side empty, none longer than ``max_len``.

    Only training data is filtered; validation and test sets are scored in full.

    Args:
        src: token ids of each source sentence.
        tgt: token ids of each target sentence, aligned with ``src``.
        max_len: the most tokens allowed on either side.

    Returns:
        The kept indices in their original order, and how many pairs were dropped as
        ``{"empty": n, "too_long": m}`` (an empty pair counts as empty only).
    """
    if len(src) != len(tgt):
        raise ValueError(f"{len(src)} source but {len(tgt)} target sentences")
    keep: list[int] = []
    dropped = {"empty": 0, "too_long": 0}
    for i, (s, t) in enumerate(zip(src, tgt)):
        if not s or not t:
            dropped["empty"] += 1
        elif len(s) > max_len or len(t) > max_len:
            dropped["too_long"] += 1
        else:
            keep.append(i)
    if dropped["empty"] or dropped["too_long"]:
        log.info(
            "training pairs: kept %d of %d; dropped %d with an empty side and %d longer than %d tokens",
            len(keep), len(src), dropped["empty"], dropped["too_long"], max_len,
        )
    return keep, dropped


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

    The best model is the one with the best greedy BLEU on the validation text; at the
    end of a run, ``best.pt`` translates the test text.

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
        self.tokenizer = tokenizer if tokenizer is not None else learn_tokenizer(cfg.data, train)
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

    def score(self, translator: Translator, valid_loss: float) -> Score:
        """Greedy BLEU and chrF on the validation text."""
        scores = score(translator.translate(self.valid_src), self.valid_ref)
        text = f"BLEU {scores.bleu:.2f}, chrF {scores.chrf:.2f} (greedy)"
        return Score(scores.bleu, {"bleu": scores.bleu, "chrf": scores.chrf}, text)

    def finish(self, model: EncoderDecoder, run_dir: Path, metrics, n_demo: int) -> list[tuple[str, str]]:
        """Score ``best.pt`` on the test set and write its translations beside it."""
        if not self.test_src:
            return []
        device = str(next(model.parameters()).device)
        translator = Translator.from_checkpoint(run_dir / "best.pt", device=device)
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


class _Lazy:
    """A dataset iterated in order in this process: batches are built as they are used."""

    def __init__(self, dataset: _Collated):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        return (self.dataset[i] for i in range(len(self.dataset)))
