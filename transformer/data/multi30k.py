"""Multi30k on disk: finding, downloading and checking its files.

Multi30k task 1 is six gzip files from the GitHub repository multi30k/dataset
(``data/task1/raw/``). Every file is checked against its sha256, whether it was
downloaded or put in place by hand, so a run never trains on a damaged or different
copy. Downloads are published atomically: a file appears under its real name only
once it is complete and verified.

This module uses the standard library only (no torch), so that the data can be
fetched and checked without loading the model code.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from transformer.data.files import DataError, atomic_write

log = logging.getLogger(__name__)

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"

# sha256 of each published .gz file (not of the text inside): the bytes we download.
MULTI30K_SHA256: dict[str, str] = {
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
}

# Our split names → the file name stems Multi30k uses.
SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}

_CHUNK = 1 << 16


def resolve_data_dir(data_dir: str | None) -> Path:
    """The folder that holds (or will hold) the Multi30k files.

    Args:
        data_dir: a folder from ``--data-dir`` or the config key ``data.dir``; wins if given.

    Returns:
        ``data_dir``; else ``$TRANSFORMER_DATA/multi30k`` when that variable is set and
        non-empty; else ``data/multi30k`` under the project root (the folder above the
        ``transformer`` package when it holds pyproject.toml, i.e. a source checkout;
        the current directory for an installed package).
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("TRANSFORMER_DATA")
    if env:
        return Path(env).expanduser() / "multi30k"
    checkout = Path(__file__).resolve().parent.parent
    root = checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()
    return root / "data" / "multi30k"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, out: BinaryIO, timeout: float, what: str) -> str:
    """Stream ``url`` into the open binary file ``out``; return the sha256 of its bytes."""
    digest = hashlib.sha256()
    got, expected = 0, None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None and length.strip().isdigit() else None
            # read(n) returns b"" when the peer closes early instead of raising, hence the
            # byte count below.
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                got += len(chunk)
    except urllib.error.HTTPError as e:  # before URLError: it is one
        e.close()
        raise DataError(f"{what}: the server answered HTTP {e.code} ({e.reason})") from None
    except urllib.error.URLError as e:
        raise DataError(f"{what}: cannot reach the server ({e.reason})") from e
    except http.client.IncompleteRead as e:
        got += len(e.partial)
        raise DataError(f"{what}: connection dropped, got {got} of {expected} bytes") from None
    except (http.client.HTTPException, OSError) as e:  # reset, timeout mid-file, disk full, ...
        raise DataError(f"{what}: download failed after {got} bytes ({type(e).__name__}: {e})") from e
    except ValueError as e:  # a malformed URL
        raise DataError(f"{what}: {e}") from e
    if expected is not None and got != expected:
        raise DataError(f"{what}: connection dropped, got {got} of {expected} bytes")
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str, timeout: float = 60) -> None:
    """Download ``url`` to ``dest``, verified, so that ``dest`` is either whole or absent.

    The bytes go to a temporary file beside ``dest`` (same file system, so the final
    rename is atomic), are hashed on the way, checked against the Content-Length and
    ``sha256``, flushed to disk, and only then renamed to ``dest``.

    Args:
        url: where to fetch the file.
        dest: the file to create; its folder is created if needed.
        sha256: the expected hex digest of the downloaded bytes.
        timeout: seconds to wait for the connection and for each read.

    Raises:
        DataError: naming the file, on an HTTP error, an unreachable server, a
            connection dropped mid-file or a checksum mismatch; no file is left behind.
    """
    dest = Path(dest)
    what = f"{dest} (from {url})"

    def fetch_verified(f: BinaryIO) -> None:
        got = _fetch(url, f, timeout, what)
        if got != sha256:
            raise DataError(f"{what}: checksum mismatch, expected sha256 {sha256}, got {got}")

    log.info("downloading %s", url)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, fetch_verified)  # on any failure, Ctrl-C too, no file is left behind
    except OSError as e:
        raise DataError(f"{dest}: cannot write in {dest.parent} ({e})") from e
    log.info("saved %s (sha256 verified)", dest)


def _missing_message(data_dir: Path, missing: list[str], reason: str, base_url: str) -> str:
    return (
        f"Multi30k files missing from {data_dir}: {', '.join(missing)}\n"
        f"  reason: {reason}\n"
        f"  Fix: download them from {base_url} into {data_dir},\n"
        "  or point at a folder that holds them: the --data-dir flag, the config key data.dir"
        " (--set data.dir=DIR), or the TRANSFORMER_DATA environment variable ($TRANSFORMER_DATA/multi30k)."
    )


def ensure_multi30k(data_dir: Path, download_missing: bool = True, base_url: str = MULTI30K_URL) -> Path:
    """Make sure the six Multi30k files are in ``data_dir``, with the right checksums.

    Files already there are checked, never replaced: a file with the wrong sha256 is an
    error, since it may be the user's own. Missing files are downloaded when allowed.

    Args:
        data_dir: the folder (see ``resolve_data_dir``).
        download_missing: fetch missing files from ``base_url``.
        base_url: where the files are; each is fetched from ``base_url + name``.

    Returns:
        ``data_dir``.

    Raises:
        DataError: a present file has the wrong checksum (the message says to delete
            it), or files are missing and cannot be downloaded (the message lists them,
            the folder, and how to point at another one).
    """
    data_dir = Path(data_dir)
    missing = []
    for name, sha256 in MULTI30K_SHA256.items():
        path = data_dir / name
        if not path.exists():
            missing.append(name)
            continue
        try:
            got = _sha256_of(path)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e})") from e
        if got != sha256:
            raise DataError(
                f"{path}: sha256 is {got}, but Multi30k's {name} has {sha256}; the file is damaged or "
                "a different one. Delete it to have it downloaded again, or replace it with the right copy."
            )
    if not missing:
        return data_dir
    if not download_missing:
        raise DataError(_missing_message(data_dir, missing, "downloading is off (data.download: false)", base_url))
    for i, name in enumerate(missing):
        try:
            download(base_url + name, data_dir / name, MULTI30K_SHA256[name])
        except DataError as e:
            # Offline (the common case) or a bad download: either way the user can put the
            # files in place by hand, so say which ones are still missing and where.
            raise DataError(_missing_message(data_dir, missing[i:], str(e), base_url)) from e
    return data_dir


def split_paths(data_dir: Path, split: str, src_lang: str = "de", tgt_lang: str = "en") -> tuple[Path, Path]:
    """The (source, target) Multi30k files of ``split`` ("train", "valid" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    data_dir, stem = Path(data_dir), SPLITS[split]
    return data_dir / f"{stem}.{src_lang}.gz", data_dir / f"{stem}.{tgt_lang}.gz"
