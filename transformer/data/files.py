"""Files on disk: text read line by line with clear errors, and files written atomically.

Reading uses the standard library only (no torch), so that data can be fetched and
checked without loading the model code.
"""

from __future__ import annotations

import codecs
import gzip
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


class DataError(RuntimeError):
    """A data file that is missing, damaged or unreadable; the message names the file."""


def read_lines(path: Path) -> list[str]:
    """Read a text file (gzip-compressed if its name ends in ``.gz``), one entry per line.

    Lines are split on ``"\\n"`` only, so characters such as U+2028, U+0085 or form feed
    stay inside their line (``str.splitlines`` would split there and misalign a
    parallel corpus). Each line is ``.strip()``-ed: Multi30k's train.de has trailing
    spaces, a tab and no-break spaces (U+00A0) at line ends; interior text is kept.
    A UTF-8 byte-order mark at the start of the file is dropped.

    Raises:
        DataError: the file is missing or unreadable (also a damaged .gz), or is not
            valid UTF-8 (the message gives the 1-based line number).
    """
    return list(iter_lines(path))


def iter_lines(source: Path | BinaryIO, name: str | None = None) -> Iterator[str]:
    """Yield the lines of a file, or of an open binary stream such as stdin, one by one.

    The same rules and errors as ``read_lines``, which reads a whole file this way;
    a stream is read as it arrives, so a pipe can be translated line by line.
    ``name`` stands for the stream in error messages.
    """
    if isinstance(source, (str, Path)):
        for number, raw in enumerate(iter_raw_lines(Path(source)), 1):
            yield decode_line(raw, str(source), number)
    else:
        yield from _decode_lines(source, name or getattr(source, "name", "<stream>"))


def _decode_lines(f: BinaryIO, name: str) -> Iterator[str]:
    for number, raw in enumerate(_raw_lines(f, name), 1):
        yield decode_line(raw, name, number)


def decode_line(raw: bytes, name: str, number: int) -> str:
    """One line's text, stripped, from its bytes (as ``iter_raw_lines`` yields them).

    Raises:
        DataError: the bytes are not valid UTF-8 (the message names ``name`` and ``number``).
    """
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"{name}, line {number}: not valid UTF-8 ({e.reason})") from None


def iter_raw_lines(path: Path) -> Iterator[bytes]:
    """The lines of a file (gzip-compressed if its name ends in ``.gz``) as bytes, not yet
    decoded: for readers that decode them elsewhere (in worker processes) with
    ``decode_line``. The byte-order mark is dropped and read errors raised as in ``iter_lines``."""
    path = Path(path)
    try:
        f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    with f:
        yield from _raw_lines(f, str(path))


def _raw_lines(f: BinaryIO, name: str) -> Iterator[bytes]:
    number = 0
    try:
        for number, raw in enumerate(f, 1):  # binary files split on b"\n" only
            yield raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a damaged .gz
        raise DataError(f"{name}: cannot read after line {number} ({type(e).__name__}: {e})") from e


def read_parallel(src_path: Path, tgt_path: Path) -> list[tuple[str, str]]:
    """Read two line-aligned files into (source, target) pairs.

    Raises:
        DataError: a file cannot be read, or the two have different line counts.
    """
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
            "line i of one must translate line i of the other"
        )
    return list(zip(src, tgt))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then
    rename it over ``path``: readers see the old file or the whole new one.

    If ``write`` raises (a failed check, Ctrl-C), the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (not possible on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
