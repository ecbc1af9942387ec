"""Reading a parallel corpus as a stream and encoding it into flat id files.

The pieces of a prepare (``transformer.data.prepare``) that touch every line: the two
files read in step, line by line, with their line counts checked; a seeded sample of
pairs for learning the tokenizer; and the encoding of a split, in chunks, by worker
processes that need no torch.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
from collections import deque
from collections.abc import Iterator
from itertools import chain, zip_longest
from pathlib import Path
from typing import Any

import numpy as np

from transformer.data.files import DataError, decode_line, iter_raw_lines
from transformer.data.prepared import SIDES
from transformer.data.tokenizers import tokenizer_from_state

CHUNK = 10_000  # pairs per job sent to a worker
SERIAL_PAIRS = 50_000  # pairs of a split encoded in this process before workers are started
SAMPLE_SEED = 1  # the tokenizer's sample depends on the corpus alone, not on train.seed


def line_pairs(src_path: Path, tgt_path: Path) -> Iterator[tuple[bytes, bytes]]:
    """The raw (undecoded) lines of two line-aligned files, pair by pair.

    Raises:
        DataError: a file cannot be read, or the two have different line counts (both
            counted in the message).
    """
    n = 0
    for n, (src, tgt) in enumerate(zip_longest(iter_raw_lines(src_path), iter_raw_lines(tgt_path)), 1):
        if src is None or tgt is None:
            total = sum(1 for _ in iter_raw_lines(tgt_path if src is None else src_path))  # the longer file
            counts = (n - 1, total) if src is None else (total, n - 1)
            raise DataError(
                f"{src_path} has {counts[0]} lines but {tgt_path} has {counts[1]}; "
                "line i of one must translate line i of the other"
            )
        yield src, tgt


def sample_pairs(src_path: Path, tgt_path: Path, k: int, progress: bool = False) -> tuple[list[tuple[str, str]], int]:
    """A seeded random sample of ``k`` pairs (all of them, when there are fewer), in
    corpus order, and the number of pairs. ``k`` 0 means all.

    The sample is drawn while the files stream past (reservoir sampling): its memory is
    that of ``k`` pairs, whatever the corpus size.
    """
    from tqdm import tqdm

    rng = random.Random(SAMPLE_SEED)
    reservoir: list[tuple[int, bytes, bytes]] = []
    n = 0
    for n, (src, tgt) in enumerate(tqdm(line_pairs(src_path, tgt_path), desc="sampling", unit=" pairs",
                                        disable=not progress, leave=False, mininterval=1), 1):
        if k <= 0 or len(reservoir) < k:
            reservoir.append((n, src, tgt))
        elif (j := rng.randrange(n)) < k:
            reservoir[j] = (n, src, tgt)
    reservoir.sort()
    pairs = [(decode_line(s, str(src_path), i), decode_line(t, str(tgt_path), i)) for i, s, t in reservoir]
    return pairs, n


def filter_training_pairs(
    src_lengths: list[int], tgt_lengths: list[int], max_len: int
) -> tuple[list[int], dict[str, int]]:
    """Indices of the training pairs to keep: neither side empty, none longer than ``max_len``.

    Only training data is filtered; validation and test sets are scored in full.

    Args:
        src_lengths, tgt_lengths: each pair's token counts, special tokens left out.
        max_len: the most tokens allowed on either side.

    Returns:
        The kept indices in their original order, and how many pairs were dropped as
        ``{"empty": n, "too_long": m}`` (an empty pair counts as empty only).
    """
    if len(src_lengths) != len(tgt_lengths):
        raise ValueError(f"{len(src_lengths)} source but {len(tgt_lengths)} target sentences")
    keep: list[int] = []
    dropped = {"empty": 0, "too_long": 0}
    for i, (s, t) in enumerate(zip(src_lengths, tgt_lengths)):
        if not s or not t:
            dropped["empty"] += 1
        elif s > max_len or t > max_len:
            dropped["too_long"] += 1
        else:
            keep.append(i)
    return keep, dropped


# The worker processes' tokenizer, set once per process by _start_worker.
_WORKER: dict[str, Any] = {}


def _start_worker(state: dict[str, Any], dtype: str, max_len: int) -> None:
    tokenizer = tokenizer_from_state(state)
    _WORKER.update(
        tokenizer=tokenizer, dtype=np.dtype(dtype), max_len=max_len,
        # The specials each side adds (</s>; <s> and </s>): lengths below leave them out.
        extra=(len(tokenizer.encode_src("")), len(tokenizer.encode_tgt(""))),
    )


def encode_chunk(job: tuple[bool, str, str, int, list[bytes], list[bytes]]) -> dict[str, Any]:
    """Encode one chunk of line pairs (in a worker, or in this process after ``_start_worker``).

    Args:
        job: (whether to drop empty and over-long pairs, the two files' names, the
            chunk's first line number, the source lines, the target lines).

    Returns:
        The flat ids and the lengths of each side, and the counts of dropped pairs.
    """
    drop, src_name, tgt_name, first, src_lines, tgt_lines = job
    tok, max_len = _WORKER["tokenizer"], _WORKER["max_len"]
    src_extra, tgt_extra = _WORKER["extra"]
    src_ids, tgt_ids = [], []
    for number, (src_raw, tgt_raw) in enumerate(zip(src_lines, tgt_lines), first):
        src_ids.append(tok.encode_src(decode_line(src_raw, src_name, number)))
        tgt_ids.append(tok.encode_tgt(decode_line(tgt_raw, tgt_name, number)))
    dropped = {"empty": 0, "too_long": 0}
    if drop:
        keep, dropped = filter_training_pairs([len(s) - src_extra for s in src_ids],
                                              [len(t) - tgt_extra for t in tgt_ids], max_len)
        if len(keep) < len(src_ids):
            src_ids, tgt_ids = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
    out: dict[str, Any] = {"dropped": dropped}
    for side, ids in (("src", src_ids), ("tgt", tgt_ids)):
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        out[side] = np.fromiter(chain.from_iterable(ids), dtype=_WORKER["dtype"], count=int(lengths.sum()))
        out[f"{side}_lengths"] = lengths
    return out


def encode_split(
    split: str, paths: tuple[Path, Path], folder: Path, state: dict[str, Any], dtype: np.dtype, max_len: int,
    workers: int, progress: bool = False,
) -> dict[str, Any]:
    """Encode one split into ``folder``'s ``{split}.{side}.bin`` and ``.idx`` files.

    The first ``SERIAL_PAIRS`` pairs are encoded here; a longer split goes on in
    ``workers`` processes, at most two chunks each in flight, so memory stays bounded.

    Returns:
        The split's record for the manifest (pairs kept, lines read, dropped counts, tokens).
    """
    from tqdm import tqdm

    drop = split == "train"
    names = tuple(str(p) for p in paths)
    _start_worker(state, dtype.name, max_len)
    lengths: dict[str, list[np.ndarray]] = {side: [] for side in SIDES}
    dropped = {"empty": 0, "too_long": 0}
    lines = 0
    bar = tqdm(desc=f"encoding {split}", unit=" pairs", disable=not progress, leave=False, mininterval=1)
    with contextlib.ExitStack() as stack:
        out = {side: stack.enter_context(open(folder / f"{split}.{side}.bin", "wb")) for side in SIDES}

        def write(result: dict[str, Any], n: int) -> None:
            for side in SIDES:
                out[side].write(result[side].tobytes())
                lengths[side].append(result[f"{side}_lengths"])
            for key in dropped:
                dropped[key] += result["dropped"][key]
            bar.update(n)

        pool, pending = None, deque()
        for first, src_lines, tgt_lines in _chunks(line_pairs(*paths)):
            job = (drop, *names, first, src_lines, tgt_lines)
            lines += len(src_lines)
            if pool is None and (first - 1 < SERIAL_PAIRS or workers <= 1):
                write(encode_chunk(job), len(src_lines))
                continue
            if pool is None:
                context = multiprocessing.get_context("spawn")  # no copy of this process's threads or torch
                pool = stack.enter_context(context.Pool(workers, _start_worker, (state, dtype.name, max_len)))
            pending.append((pool.apply_async(encode_chunk, (job,)), len(src_lines)))
            while len(pending) > 2 * workers:
                result, n = pending.popleft()
                write(result.get(), n)
        while pending:
            result, n = pending.popleft()
            write(result.get(), n)
        for side in SIDES:
            out[side].flush()
            os.fsync(out[side].fileno())
    bar.close()
    record: dict[str, Any] = {"lines": lines, "dropped": dropped}
    for side in SIDES:
        side_lengths = np.concatenate([np.zeros(1, np.int64), *lengths[side]])
        offsets = np.cumsum(side_lengths)
        with open(folder / f"{split}.{side}.idx", "wb") as f:
            f.write(offsets.tobytes())
            f.flush()
            os.fsync(f.fileno())
        record["pairs"] = len(offsets) - 1
        record[f"{side}_tokens"] = int(offsets[-1])
    return record


def _chunks(pairs: Iterator[tuple[bytes, bytes]]) -> Iterator[tuple[int, list[bytes], list[bytes]]]:
    """(first line number, source lines, target lines) for every ``CHUNK`` pairs."""
    src: list[bytes] = []
    tgt: list[bytes] = []
    first = 1
    for s, t in pairs:
        src.append(s)
        tgt.append(t)
        if len(src) == CHUNK:
            yield first, src, tgt
            first += CHUNK
            src, tgt = [], []
    if src:
        yield first, src, tgt
