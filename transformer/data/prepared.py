"""A prepared corpus: a parallel corpus tokenized once into flat token-id arrays on disk.

A prepared corpus is a folder:

* ``{split}.{side}.bin``: the ids of every sentence of the split, one after the other
  (uint16 while the vocabulary fits, else uint32), for split ``train``, ``valid`` and
  ``test`` and side ``src`` (ids ending with ``</s>``) and ``tgt`` (``<s>`` ... ``</s>``);
* ``{split}.{side}.idx``: int64 offsets, sentence ``i`` being ``ids[idx[i]:idx[i + 1]]``;
* ``tokenizer.pt``: the tokenizer that made the ids;
* ``manifest.json``: what the corpus was built from (the input files' paths, sizes and
  modification times; the data settings; the tokenizer's digest) and what each file
  holds. It is written last: a folder without it is not a prepared corpus.

Opened, the id arrays stay on disk as numpy memmaps: a batch reads its sentences' pages,
the operating system keeps them in its page cache, and every process that opens the
same files (the torchrun processes of one run, or several runs) shares those pages
instead of holding a copy. Only the lengths (4 bytes a sentence and side) are in memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transformer.data.files import DataError

if TYPE_CHECKING:
    from transformer.data.batching import Batch
    from transformer.data.tokenizers import Tokenizer

FORMAT = 1  # the layout above; a folder of another format is rebuilt
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
SIDES = ("src", "tgt")


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_digest(state: dict[str, Any]) -> str:
    """sha256 of a tokenizer's ``state_dict`` (bytes taken as hex): equal for equal tokenizers."""
    text = json.dumps(state, sort_keys=True, default=lambda b: b.hex() if isinstance(b, bytes) else str(b))
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder``, or None when it has none (not prepared, or not finished).

    Raises:
        DataError: the manifest exists but cannot be read as one.
    """
    path = Path(folder) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not a prepared corpus's manifest (line {e.lineno}: {e.msg})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not a prepared corpus's manifest")
    return manifest


def damaged(folder: Path, manifest: dict[str, Any]) -> str | None:
    """What is wrong with the files of a finished prepared corpus (a file missing, or of
    another size than its manifest records), or None."""
    for name, size in manifest.get("files", {}).items():
        path = Path(folder) / name
        got = path.stat().st_size if path.is_file() else None
        if got != size:
            found = "missing" if got is None else f"{got} bytes"
            return f"{path}: {found}, but the manifest records {size} bytes: the prepared corpus is damaged"
    return None


class Split:
    """One split of a parallel corpus as token ids: sentence pairs by index, their
    lengths in memory.

    Args:
        name: "train", "valid" or "test".
        ids: for side "src" and "tgt", every sentence's ids one after the other.
        offsets: for each side, int64 offsets into ``ids``, one more than there are pairs.
    """

    def __init__(self, name: str, ids: dict[str, np.ndarray], offsets: dict[str, np.ndarray]):
        self.name, self.ids, self.offsets = name, ids, offsets
        self.src_lengths = np.diff(self.offsets["src"]).astype(np.int32)
        self.tgt_lengths = np.diff(self.offsets["tgt"]).astype(np.int32)

    @classmethod
    def open(cls, folder: Path, name: str, dtype: np.dtype) -> "Split":
        """Split ``name`` of the prepared corpus in ``folder``, its ids left on disk (memmaps).

        Args:
            dtype: the ids' type (the manifest's ``dtype``).
        """
        ids = {side: _memmap(folder / f"{name}.{side}.bin", dtype) for side in SIDES}
        offsets = {side: _memmap(folder / f"{name}.{side}.idx", np.dtype(np.int64)) for side in SIDES}
        return cls(name, ids, offsets)

    def __len__(self) -> int:
        return len(self.src_lengths)

    def pair(self, i: int) -> tuple[list[int], list[int]]:
        """The (source, target) ids of pair ``i``, as the tokenizer encoded them."""
        return tuple(  # type: ignore[return-value]
            self.ids[side][self.offsets[side][i]:self.offsets[side][i + 1]].tolist() for side in SIDES
        )

    def padded(self, index: np.ndarray, side: str, pad: int) -> np.ndarray:
        """The sentences ``index`` of ``side``, right-padded into a (len(index), longest) int64 array."""
        starts = self.offsets[side][index]
        lengths = self.offsets[side][index + 1] - starts
        out = np.full((len(index), int(lengths.max(initial=0))), pad, dtype=np.int64)
        # Where every id of the batch is in the flat array, row after row: each row's
        # start, repeated over its length, plus the position within the row.
        before = np.cumsum(lengths) - lengths
        positions = np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))
        out[np.arange(out.shape[1]) < lengths[:, None]] = self.ids[side][positions]
        return out

    def batch(self, index: np.ndarray, pad: int) -> Batch:
        """The pairs ``index`` as a padded ``Batch``."""
        import torch

        from transformer.data.batching import Batch

        index = np.asarray(index, dtype=np.int64)
        src, tgt = (torch.from_numpy(self.padded(index, side, pad)) for side in SIDES)
        return Batch(src, tgt, pad=pad)


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class PreparedCorpus:
    """An opened prepared corpus: its tokenizer and its splits (``test`` may be None)."""

    folder: Path
    manifest: dict[str, Any]
    tokenizer: Tokenizer
    train: Split
    valid: Split
    test: Split | None

    @classmethod
    def open(cls, folder: Path) -> "PreparedCorpus":
        """Open a finished prepared corpus, checking that every file has the size its
        manifest records (a truncated or half-copied folder is refused).

        Raises:
            DataError: naming the folder or the file that is missing or damaged.
        """
        import torch

        from transformer.data.tokenizers import tokenizer_from_state

        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise DataError(f"{folder}: not a prepared corpus (no {MANIFEST}; an unfinished prepare leaves none)")
        if manifest.get("format") != FORMAT:
            raise DataError(f"{folder}: a prepared corpus of format {manifest.get('format')}, expected {FORMAT}")
        if (problem := damaged(folder, manifest)) is not None:
            raise DataError(problem)
        try:
            state = torch.load(folder / "tokenizer.pt", map_location="cpu", weights_only=True)
            tokenizer = tokenizer_from_state(state["tokenizer"])
        except Exception as e:  # any failure to load means a damaged file
            raise DataError(f"{folder / 'tokenizer.pt'}: cannot load the tokenizer ({e})") from e
        dtype = np.dtype(manifest["dtype"])
        splits = {name: Split.open(folder, name, dtype) if name in manifest["splits"] else None for name in SPLITS}
        for name, split in splits.items():
            if split is not None and len(split) != manifest["splits"][name]["pairs"]:
                raise DataError(f"{folder}: {name} holds {len(split)} pairs, the manifest says "
                                f"{manifest['splits'][name]['pairs']}: the prepared corpus is damaged")
        return cls(folder, manifest, tokenizer, splits["train"], splits["valid"], splits["test"])
