"""What a run learns, and how it is judged: the article's copy task, and translation.

A task gives a run its tokenizer, each epoch's batches and the validation batches; it
scores the model at every evaluation point (``score``: the figure that picks
``best.pt``) and reports at the end of the run (``finish``). ``build_task`` makes the
one ``data.task`` names; the run never asks which one it has.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from transformer.config import Config
from transformer.data.batching import Batch
from transformer.data.tokenizers import Tokenizer


@dataclass
class Score:
    """A model's score at an evaluation point.

    Attributes:
        value: higher is better; with ``train.best_metric: score`` the best value so far
            is kept as ``best.pt``.
        metrics: figures for ``metrics.jsonl`` (besides the validation loss).
        text: the same figures for the log line, or "".
    """

    value: float
    metrics: dict[str, Any] = field(default_factory=dict)
    text: str = ""


class Task(Protocol):
    tokenizer: Tokenizer

    def train_batches(self, epoch: int, start: int = 0) -> Iterable[Batch]:
        """Epoch ``epoch``'s batches (0-based) from batch ``start`` on, the same every
        time they are asked for."""
        ...

    def valid_batches(self) -> Iterable[Batch]: ...

    def score(self, translator: Any, valid_loss: float) -> Score:
        """Judge the model ``translator`` decodes with (greedily) at an evaluation point."""
        ...

    def finish(self, model: Any, run_dir: Path, metrics: Any, n_demo: int) -> list[tuple[str, str]]:
        """At the end of a run: test, log a few decoded examples and return them."""
        ...


def build_task(cfg: Config, tokenizer: Tokenizer | None = None) -> Task:
    """The task ``data.task`` names; a translation task learns its tokenizer unless one is given."""
    if cfg.data.task == "copy":
        from transformer.tasks.copy import CopyTask

        return CopyTask(cfg.data.copy, cfg.train.seed, cfg.decode)
    from transformer.tasks.translation import TranslationTask

    return TranslationTask(cfg, tokenizer)
