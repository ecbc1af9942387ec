"""Data files: download against a real local HTTP server, checksums, reading, filtering.

Nothing here contacts any host but 127.0.0.1. Tests marked as needing the real Multi30k
files use data/multi30k in the checkout and are skipped when it is absent.
"""

import functools
import gzip
import hashlib
import shutil
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import transformer
from transformer.data.files import DataError, read_lines, read_parallel
from transformer.data.multi30k import MULTI30K_SHA256, SPLITS, download, ensure_multi30k, resolve_data_dir, split_paths
from transformer.data.encode import filter_training_pairs

REAL_DIR = Path(__file__).parent.parent / "data" / "multi30k"
needs_real = pytest.mark.skipif(
    not all((REAL_DIR / name).is_file() for name in MULTI30K_SHA256),
    reason=f"the real Multi30k files are not in {REAL_DIR} (link or copy them there to run this test)",
)


class Server:
    """A local HTTP server over ``root``; ``/drop/NAME`` sends half of NAME and hangs up."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path.startswith("/drop/"):
                    body = (server.root / self.path[len("/drop/"):]).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True  # then the socket is closed: a clean early EOF
                    return
                super().do_GET()

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def add(self, name: str, data: bytes) -> str:
        """Serve ``data`` as ``name``; returns its sha256."""
        (self.root / name).write_bytes(data)
        return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    srv = Server(root)
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join(timeout=5)


@pytest.fixture
def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def gz(text: str) -> bytes:
    return gzip.compress(text.encode("utf-8"))


# ---------------------------------------------------------------- download


def test_download_good_file(server, tmp_path):
    data = gz("ein Hund\n" * 1000) + bytes(range(256)) * 500  # a few chunks' worth
    sha = server.add("good.gz", data)
    out = tmp_path / "out"
    download(server.url + "good.gz", out / "good.gz", sha)
    assert (out / "good.gz").read_bytes() == data
    assert [p.name for p in out.iterdir()] == ["good.gz"]  # no temporary file left


def test_download_checksum_mismatch_keeps_nothing(server, tmp_path):
    server.add("corrupt.gz", gz("different bytes\n"))
    expected = hashlib.sha256(b"what we expected").hexdigest()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="checksum") as e:
        download(server.url + "corrupt.gz", out / "corrupt.gz", expected)
    assert "corrupt.gz" in str(e.value) and expected in str(e.value)
    assert list(out.iterdir()) == []


def test_download_connection_dropped_mid_file(server, tmp_path):
    data = bytes(range(256)) * 400
    sha = server.add("big.gz", data)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=f"got {len(data) // 2} of {len(data)} bytes") as e:
        download(server.url + "drop/big.gz", out / "big.gz", sha)
    assert "big.gz" in str(e.value)
    assert list(out.iterdir()) == []


def test_download_http_404(server, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="404") as e:
        download(server.url + "nothere.gz", out / "nothere.gz", "0" * 64)
    assert "nothere.gz" in str(e.value)
    assert list(out.iterdir()) == []


def test_download_unreachable(closed_port_url, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="cannot reach") as e:
        download(closed_port_url + "x.gz", out / "x.gz", "0" * 64, timeout=5)
    assert "x.gz" in str(e.value)
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- ensure_multi30k


def assert_missing_message(message: str, folder: Path, names) -> None:
    for name in names:
        assert name in message
    assert str(folder) in message
    for way in ("--data-dir", "data.dir", "TRANSFORMER_DATA"):
        assert way in message


def test_ensure_offline_lists_every_missing_file(closed_port_url, tmp_path):
    folder = tmp_path / "multi30k"
    with pytest.raises(DataError) as e:
        ensure_multi30k(folder, base_url=closed_port_url)
    assert_missing_message(str(e.value), folder, MULTI30K_SHA256)
    assert not folder.exists() or list(folder.iterdir()) == []


def test_ensure_without_download_lists_every_missing_file(server, tmp_path):
    folder = tmp_path / "multi30k"
    folder.mkdir()
    with pytest.raises(DataError) as e:
        ensure_multi30k(folder, download_missing=False, base_url=server.url)
    assert_missing_message(str(e.value), folder, MULTI30K_SHA256)
    assert server.requests == []


def test_ensure_reports_a_wrong_present_file_and_keeps_it(server, tmp_path):
    folder = tmp_path / "multi30k"
    folder.mkdir()
    mine = gz("my own corpus\n")
    (folder / "train.de.gz").write_bytes(mine)
    with pytest.raises(DataError, match="[Dd]elete") as e:
        ensure_multi30k(folder, base_url=server.url)
    assert str(folder / "train.de.gz") in str(e.value)
    assert (folder / "train.de.gz").read_bytes() == mine
    assert server.requests == []  # checked before downloading anything


@needs_real
def test_ensure_downloads_the_six_files_once(server, tmp_path):
    for name in MULTI30K_SHA256:
        shutil.copyfile(REAL_DIR / name, server.root / name)
    folder = tmp_path / "multi30k"
    assert ensure_multi30k(folder, base_url=server.url) == folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(MULTI30K_SHA256)
    for name, sha in MULTI30K_SHA256.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sha
    assert len(server.requests) == 6
    ensure_multi30k(folder, base_url=server.url)
    assert len(server.requests) == 6  # all present and valid: nothing fetched again


# ---------------------------------------------------------------- resolve_data_dir


def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    checkout = Path(transformer.__file__).resolve().parent.parent
    assert (checkout / "pyproject.toml").is_file()
    monkeypatch.delenv("TRANSFORMER_DATA", raising=False)
    assert resolve_data_dir(None) == checkout / "data" / "multi30k"
    monkeypatch.setenv("TRANSFORMER_DATA", "")  # empty counts as unset
    assert resolve_data_dir(None) == checkout / "data" / "multi30k"
    monkeypatch.setenv("TRANSFORMER_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path / "multi30k"
    assert resolve_data_dir(str(tmp_path / "mine")) == tmp_path / "mine"  # flag/config wins


def test_split_paths(tmp_path):
    assert split_paths(tmp_path, "valid") == (tmp_path / "val.de.gz", tmp_path / "val.en.gz")
    assert split_paths(tmp_path, "test", "en", "de") == (
        tmp_path / "test_2016_flickr.en.gz",
        tmp_path / "test_2016_flickr.de.gz",
    )
    names = {path.name for split in SPLITS for path in split_paths(tmp_path, split)}
    assert names == set(MULTI30K_SHA256)


# ---------------------------------------------------------------- reading


TEXT = "ein Hund \n\tzwei\u00a0Katzen\u00a0\n\u00a0drei\u2028vier\x85fünf\x0csechs\n\n"
EXPECTED = ["ein Hund", "zwei\u00a0Katzen", "drei\u2028vier\x85fünf\x0csechs", ""]


@pytest.mark.parametrize("name", ["lines.txt", "lines.gz"])
def test_read_lines_plain_and_gz(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gz(TEXT) if name.endswith(".gz") else TEXT.encode("utf-8"))
    assert read_lines(path) == EXPECTED


def test_read_lines_without_final_newline(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"one\ntwo")
    assert read_lines(path) == ["one", "two"]
    path.write_bytes(b"")
    assert read_lines(path) == []


def test_read_lines_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.de.gz"
    path.write_bytes(gzip.compress(b"gut\nauch gut\nschlecht \xff\xfe hier\nwieder gut\n"))
    with pytest.raises(DataError, match="line 3") as e:
        read_lines(path)
    assert "bad.de.gz" in str(e.value)


def test_read_lines_missing_or_damaged_file(tmp_path):
    with pytest.raises(DataError, match="nothere.txt"):
        read_lines(tmp_path / "nothere.txt")
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gz("x\n" * 1000)[:30])  # a truncated gzip stream
    with pytest.raises(DataError, match="broken.gz"):
        read_lines(broken)


def test_read_parallel(tmp_path):
    src, tgt = tmp_path / "a.de", tmp_path / "a.en"
    src.write_text("ein Hund\nzwei Katzen\n", encoding="utf-8")
    tgt.write_text("a dog\ntwo cats\n", encoding="utf-8")
    assert read_parallel(src, tgt) == [("ein Hund", "a dog"), ("zwei Katzen", "two cats")]
    tgt.write_text("a dog\ntwo cats\nthree mice\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_parallel(src, tgt)
    message = str(e.value)
    assert all(s in message for s in (str(src), str(tgt), "2", "3"))


@needs_real
def test_real_multi30k_files():
    sizes = {"train": 29_000, "valid": 1_014, "test": 1_000}
    for split, size in sizes.items():
        pairs = read_parallel(*split_paths(REAL_DIR, split))
        assert len(pairs) == size
        for line in (s for pair in pairs for s in pair):
            assert line == line.strip() and line
    train = read_parallel(*split_paths(REAL_DIR, "train"))
    assert train[0][1] == "Two young, White males are outside near many bushes."
    # Interior irregular whitespace is kept (line 7366 of train.de has a tab).
    assert "spielen in einer \tWasserfontäne." in train[7365][0]


# ---------------------------------------------------------------- filtering


def test_filter_training_pairs():
    src = [[1, 2], [], [1] * 5, [3], [4, 5, 6], [7], [8] * 6]
    tgt = [[9], [1], [2], [1] * 6, [], [1] * 5, [2]]
    keep, dropped = filter_training_pairs([len(s) for s in src], [len(t) for t in tgt], max_len=5)
    assert keep == [0, 2, 5]
    assert dropped == {"empty": 2, "too_long": 2}
    assert filter_training_pairs([1, 2], [1, 1], max_len=2) == ([0, 1], {"empty": 0, "too_long": 0})
