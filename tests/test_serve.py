"""The translation server: its API through a real server process on 127.0.0.1, its
batching, its errors, SIGTERM, and its page in a real (headless) Chromium.

The model is a tiny one trained for a few steps on a slice of Multi30k: its outputs are
poor but differ from sentence to sentence, which is all the equivalences need (server
== ``Translator`` == ``translate.py``, concurrent == sequential, ``/attention`` ==
``attention_maps``).
"""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli

from transformer.config import load_config, to_dict

pytest.importorskip("fastapi", reason="the server needs fastapi: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="the server needs uvicorn: pip install -e '.[test]'")

from transformer.data.tokenizers import IdTokenizer  # noqa: E402
from transformer.figures.attention import attention_maps  # noqa: E402
from transformer.inference.translator import Translator  # noqa: E402
from transformer.serve.batcher import Batcher, Closed, Options  # noqa: E402
from transformer.training.checkpoint import build_model, load_model, save_checkpoint  # noqa: E402
from transformer.training.run import run_training  # noqa: E402

MULTI30K = ROOT / "data" / "multi30k"
SENTENCES = 30  # of test2016, the server's test sentences
# The main test server's limits: the test sentences fit, and a little more does not.
LIMITS = ["--max-chars", "4000", "--max-sentences", "40", "--max-body-bytes", "20000"]


def read_slice(split: str, lang: str, n: int) -> list[str]:
    with gzip.open(MULTI30K / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return f.read().split("\n")[:n]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A German→English model (1 layer, d_model 32, SentencePiece 500) trained 2 steps
    on 600 pairs: real tokenization, outputs that differ from sentence to sentence."""
    if not (MULTI30K / "train.de.gz").exists():
        pytest.skip("Multi30k files absent from data/multi30k (CI links them from ../shared/data/multi30k)")
    folder = tmp_path_factory.mktemp("serve")
    files = {}
    for split, n in (("train", 600), ("val", 5)):  # no test set: nothing is decoded at the end
        files[split] = []
        for lang in ("de", "en"):
            path = folder / f"{split}.{lang}"
            path.write_text("\n".join(read_slice(split, lang, n)) + "\n", encoding="utf-8")
            files[split].append(str(path))
    cfg = load_config(ROOT / "configs" / "multi30k.yaml", [
        f"data.train=[{files['train'][0]}, {files['train'][1]}]",
        f"data.valid=[{files['val'][0]}, {files['val'][1]}]",
        "data.vocab_size=500", "data.batch_tokens=600", "model.N=1", "model.d_model=32", "model.d_ff=64",
        "model.h=4", "train.max_steps=2", "train.amp=none", f"train.run_dir={folder / 'run'}",
    ])
    return run_training(cfg).run_dir / "last.pt"


@pytest.fixture(scope="module")
def copy_checkpoint(tmp_path_factory) -> Path:
    """An untrained copy-task model, saved as train.py saves one (its tokenizer: "ids")."""
    cfg = load_config(ROOT / "configs" / "copy.yaml", ["model.N=1", "model.d_model=32", "model.d_ff=64", "model.h=4"])
    tokenizer = IdTokenizer(cfg.data.copy.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer)
    path = tmp_path_factory.mktemp("copy") / "copy.pt"
    save_checkpoint(path, {"config": to_dict(cfg), "model": model.state_dict(), "tokenizer": tokenizer.state_dict()})
    return path


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return read_slice("test_2016_flickr", "de", SENTENCES)


@pytest.fixture(scope="module")
def translators(checkpoint):
    """In-process translators of the checkpoint by beam size (5 is its default)."""
    base = Translator.from_checkpoint(checkpoint, device="cpu")
    assert base.cfg.beam_size == 5
    return {b: Translator(base.model, base.tokenizer, dataclasses.replace(base.cfg, beam_size=b), base.device)
            for b in (1, 4, 5, 7)}


class Server:
    """A ``python -m transformer.serve`` process on 127.0.0.1 and a small client for it."""

    def __init__(self, checkpoint: Path, log: Path, *args: str):
        self.log = log
        self.out = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "transformer.serve", "--checkpoint", str(checkpoint), "--port", "0",
             "--no-access-log", *args],
            stdout=self.out, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        deadline = time.monotonic() + 120
        while not (found := re.search(r"at http://127\.0\.0\.1:(\d+)/", log.read_text(encoding="utf-8"))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not start:\n{log.read_text(encoding='utf-8')}")
            time.sleep(0.05)
        self.port = int(found.group(1))
        while True:  # the socket listens already; /health answers once the app has started
            try:
                if self.call("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not answer /health:\n{log.read_text(encoding='utf-8')}")
            time.sleep(0.05)

    def call(self, method: str, path: str, body=None, data: bytes | None = None, headers: dict | None = None,
             timeout: float = 60):
        """(status, the decoded JSON or the raw bytes, the response) of one request on a new connection."""
        headers = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=headers, encode_chunked="Transfer-Encoding" in headers)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        if response.getheader("content-type", "").startswith("application/json"):
            payload = json.loads(payload)
        return response.status, payload, response

    def translate(self, q, **options) -> dict:
        status, body, _ = self.call("POST", "/translate", {"q": q, **options})
        assert status == 200, body
        return body

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            self.out.close()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    s = Server(checkpoint, tmp_path_factory.mktemp("server") / "server.log", "--batch-wait-ms", "20", *LIMITS)
    yield s
    code = s.stop()
    assert code in (0, -signal.SIGTERM), s.log.read_text(encoding="utf-8")


# -- the batcher on its own -----------------------------------------------------------

# How long a batcher waits for company in the tests that expect a burst in one batch: long
# enough that a loaded machine's pauses between a test's submits stay inside it.
BURST_WAIT = 1.0


class Recorder:
    """A decode function that records its calls and gives each source the sum of its ids."""

    def __init__(self, fail_on: int | None = None, seconds: float = 0.0):
        self.calls: list[tuple[Options, list[list[int]]]] = []
        self.fail_on, self.seconds = fail_on, seconds
        self.lock = threading.Lock()

    def __call__(self, options, sources):
        with self.lock:
            self.calls.append((options, sources))
        time.sleep(self.seconds)  # a decoding thread is busy meanwhile
        if self.fail_on is not None and any(self.fail_on in s for s in sources):
            raise RuntimeError("this batch fails")
        return [sum(s) * options.beam_size for s in sources]


def test_the_batcher_gathers_requests_that_arrive_together():
    threads = torch.get_num_threads()
    decode = Recorder()
    batcher = Batcher(decode, workers=1, threads=1, wait=BURST_WAIT)
    try:
        greedy = []
        for i in range(5):  # arriving 20 ms apart: the first waits for the others
            greedy.append(batcher.submit([[i, 1], [i, 2]], Options(1)))
            time.sleep(0.02)
        beam = batcher.submit([[7]], Options(4))
        assert [f.result(10) for f in greedy] == [[i + 1, i + 2] for i in range(5)]
        assert beam.result(10) == [28]
    finally:
        batcher.close()
    # One call for the five greedy jobs (in order), one for the other options.
    assert [(o.beam_size, len(s)) for o, s in decode.calls] == [(1, 10), (4, 1)]
    assert decode.calls[0][1] == [[i, j] for i in range(5) for j in (1, 2)]
    assert batcher.stats.jobs == 6 and batcher.stats.batches == 2 and batcher.stats.largest_batch == 10
    assert torch.get_num_threads() == threads  # the decoding thread's setting is its own


def test_the_batcher_shares_a_burst_between_its_threads_and_keeps_to_the_budget():
    decode = Recorder(seconds=0.3)
    batcher = Batcher(decode, workers=2, wait=BURST_WAIT, batch_tokens=1000, batch_size=256)
    deadline = time.monotonic() + 10
    while batcher._gathering < 2:  # both threads wait for work
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        futures = [batcher.submit([[i]], Options(1)) for i in range(10)]
        assert [f.result(10) for f in futures] == [[i] for i in range(10)]
    finally:
        batcher.close()
    assert sorted(len(s) for _, s in decode.calls) == [5, 5]
    # The token budget: 3 sentences of 100 tokens per batch at most.
    decode = Recorder()
    batcher = Batcher(decode, workers=1, wait=BURST_WAIT, batch_tokens=300)
    try:
        futures = [batcher.submit([[1] * 100], Options(1)) for _ in range(7)]
        assert [f.result(10) for f in futures] == [[100]] * 7
    finally:
        batcher.close()
    assert [len(s) for _, s in decode.calls] == [3, 3, 1]


def test_the_batcher_survives_a_failing_batch_and_finishes_its_queue_when_closed():
    decode = Recorder(fail_on=13)
    batcher = Batcher(decode, workers=1, wait=0.01)
    bad = batcher.submit([[13]], Options(1))
    with pytest.raises(RuntimeError, match="this batch fails"):
        bad.result(10)
    assert batcher.submit([[2]], Options(1)).result(10) == [2]
    assert batcher.stats.errors == 1
    batcher.close()
    # Closing ends the wait: the queued job is decoded at once, not after 30 s.
    batcher = Batcher(Recorder(), workers=1, wait=30)
    queued = batcher.submit([[3]], Options(1))
    start = time.monotonic()
    batcher.close(timeout=10)
    assert queued.result(0) == [3] and time.monotonic() - start < 5
    with pytest.raises(Closed):
        batcher.submit([[4]], Options(1))


def test_the_batcher_skips_a_job_whose_request_went_away():
    decode = Recorder()
    batcher = Batcher(decode, workers=1, wait=BURST_WAIT)
    try:
        gone, kept = batcher.submit([[5]], Options(1)), batcher.submit([[6]], Options(1))
        assert gone.cancel()
        assert kept.result(10) == [6]
    finally:
        batcher.close()
    assert [s for _, s in decode.calls] == [[[6]]]


class Counting:
    """A stream for tests: a source [n, ...] ends after n steps, with the sum of its ids;
    it records the rows of every step and fails a step holding a source [13]."""

    steps: list[list] = []  # every stream's steps, in order (each a list of keys)
    lock = threading.Lock()

    def __init__(self, seconds: float = 0.005):
        self.rows: dict = {}
        self.seconds = seconds

    def add(self, key, source):
        self.rows[key] = [source[0], sum(source), source]

    def __len__(self):
        return len(self.rows)

    def step(self):
        with Counting.lock:
            Counting.steps.append(sorted(self.rows))
        time.sleep(self.seconds)
        if any(row[2] == [13] for row in self.rows.values()):
            raise RuntimeError("this step fails")
        ended = []
        for key, row in list(self.rows.items()):
            row[0] -= 1
            if row[0] <= 0:
                ended.append((key, row[1]))
                del self.rows[key]
        return ended


def greedy(options):
    return options.beam_size == 1


def test_a_streaming_batcher_lets_sentences_join_and_leave_between_steps():
    Counting.steps = []
    decode = Recorder()
    batcher = Batcher(decode, workers=1, wait=0.3, stream=Counting, streams=greedy)
    try:
        long = batcher.submit([[200, 1]], Options(1))  # 200 steps of 5 ms: 1 s at least
        while not Counting.steps:
            time.sleep(0.001)
        short = batcher.submit([[3], [2, 5]], Options(1))
        beam = batcher.submit([[7]], Options(4))  # not streamed: a batch between two steps
        assert short.result(10) == [3, 7] and not long.done()
        assert beam.result(10) == [28] and not long.done()
        assert long.result(10) == [201]
    finally:
        batcher.close()
    # The short job joined the long one's rows, and left them first.
    both = [step for step in Counting.steps if len(step) > 1]
    assert 1 <= len(both) <= 3 and len(Counting.steps) == 200
    assert decode.calls == [(Options(4), [[7]])]
    assert batcher.stats.jobs == 3 and batcher.stats.steps == 200 and batcher.stats.streaming == 0


def test_without_a_stream_the_jobs_it_would_take_are_batched():
    decode = Recorder()
    batcher = Batcher(decode, workers=1, wait=0.01, streams=greedy)  # CTranslate2's case: no stream
    try:
        assert batcher.submit([[2, 3]], Options(1)).result(10) == [5]
    finally:
        batcher.close()
    assert decode.calls == [(Options(1), [[2, 3]])] and batcher.stats.steps == 0


def test_a_streaming_batcher_shares_sentences_between_its_threads():
    Counting.steps = []
    batcher = Batcher(Recorder(), workers=2, wait=0.3, stream=lambda: Counting(0.02), streams=greedy)
    try:
        futures = [batcher.submit([[5, i]], Options(1)) for i in range(8)]
        assert [f.result(10) for f in futures] == [[5 + i] for i in range(8)]
    finally:
        batcher.close()
    # Each thread's stream holds about half of the sentences in flight, never all of them.
    assert max(len(step) for step in Counting.steps) <= 5
    assert batcher.stats.sentences == 8


def test_a_streaming_batcher_survives_a_failing_step_and_finishes_when_closed():
    batcher = Batcher(Recorder(), workers=1, wait=0.3, stream=Counting, streams=greedy)
    bad = batcher.submit([[13]], Options(1))
    with pytest.raises(RuntimeError, match="this step fails"):
        bad.result(10)
    assert batcher.submit([[2, 2]], Options(1)).result(10) == [4]
    assert batcher.stats.errors == 1
    queued = [batcher.submit([[20, i]], Options(1)) for i in range(3)]
    batcher.close(timeout=10)
    assert [f.result(0) for f in queued] == [[20 + i] for i in range(3)]


def test_a_sentence_decodes_the_same_alone_and_in_a_batch(translators, sentences):
    """What the batching rests on: in a batch with others (padded, sorted by length) a
    sentence gets the same hypotheses as alone, greedy and with beam search."""
    for beam in (1, 5):
        t = translators[beam]
        sources = t.encode(sentences)
        together = t.search(sources, nbest=min(beam, 3))
        for source, hyps in zip(sources, together):
            (alone,) = t.search([source], nbest=min(beam, 3))
            assert [h.tokens for h in alone] == [h.tokens for h in hyps]
            assert [h.score for h in alone] == pytest.approx([h.score for h in hyps], abs=1e-5, nan_ok=True)


# -- the API, through a real server ---------------------------------------------------


def test_translate_gives_what_the_translator_and_translate_py_give(server, checkpoint, translators, sentences,
                                                                    tmp_path):
    expected = translators[5].translate(sentences)  # the checkpoint's beam 5, batched
    # The tiny model's outputs differ from sentence to sentence, so that results sent to
    # the wrong request would show.
    assert len(set(expected)) > SENTENCES // 2
    assert [server.translate(s)["translatedText"] for s in sentences] == expected
    assert server.translate(sentences, source="de", target="en")["translatedText"] == expected
    assert server.translate(sentences, beam_size=1)["translatedText"] == translators[1].translate(sentences)
    source = tmp_path / "test.de"
    source.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    result = run_cli("translate.py", "--checkpoint", str(checkpoint), "--input", str(source))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected


def test_concurrent_requests_give_the_sequential_outputs_and_share_batches(server, translators, sentences):
    before = server.call("GET", "/health")[1]["batching"]
    greedy, beam = translators[1].translate(sentences), translators[5].translate(sentences)
    nbest = translators[5].translate_nbest(sentences, 3)
    requests = [(s, {"beam_size": 1}) for s in sentences] + [(s, {}) for s in sentences] \
        + [(s, {"alternatives": 2}) for s in sentences]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: server.translate(r[0], **r[1]), requests))
    n = len(sentences)
    assert [a["translatedText"] for a in answers[:n]] == greedy
    assert [a["translatedText"] for a in answers[n : 2 * n]] == beam
    for answer, hyps in zip(answers[2 * n :], nbest):
        assert [answer["translatedText"], *answer["alternatives"]] == [text for text, _ in hyps]
        assert answer["scores"] == pytest.approx([score for _, score in hyps], abs=1e-5)
    after = server.call("GET", "/health")[1]["batching"]
    jobs, batches = after["jobs"] - before["jobs"], after["batches"] - before["batches"]
    assert jobs == 3 * n
    assert batches < jobs / 2, "concurrent requests were not decoded together"


def test_alternatives_are_the_nbest_list_with_its_scores(server, translators, sentences):
    nbest = translators[4].translate_nbest(sentences[:3], 4)
    answer = server.translate(sentences[:3], beam_size=4, alternatives=3)
    assert answer["translatedText"] == [hyps[0][0] for hyps in nbest]
    assert answer["alternatives"] == [[text for text, _ in hyps[1:]] for hyps in nbest]
    assert answer["scores"] == [pytest.approx([s for _, s in hyps], abs=1e-5) for hyps in nbest]
    assert all(a == sorted(a, reverse=True) for a in answer["scores"])
    # More alternatives than the default beam (5) holds widen it.
    answer = server.translate(sentences[0], alternatives=6)
    assert [answer["translatedText"], *answer["alternatives"]] == \
        [text for text, _ in translators[7].translate_nbest(sentences[:1], 7)[0]]
    assert "alternatives" not in server.translate(sentences[0])


def test_attention_gives_every_layer_and_head_as_attention_maps_does(server, translators, sentences):
    t = translators[5]
    (src,) = t.encode(sentences[:1])
    (hyp,) = t.translate_ids([src])
    tgt = [t.tokenizer.bos_id, *hyp]
    expected = attention_maps(t.model, src, tgt, t.tokenizer.pad_id)
    status, body, _ = server.call("POST", "/attention", {"q": sentences[0]})
    assert status == 200, body
    assert body["translatedText"] == t.translate(sentences[:1])[0]
    assert body["source_tokens"] == t.tokenizer.pieces(src, "src")
    assert body["target_tokens"] == t.tokenizer.pieces(tgt, "tgt")
    assert (body["layers"], body["heads"]) == (1, 4)
    for kind, weights in expected.items():
        got = torch.tensor(body[kind], dtype=torch.float64)
        assert got.shape == weights.shape, kind
        assert torch.allclose(got, weights.double(), atol=6e-5, rtol=0), kind  # rounded to 4 decimals


def test_info_languages_health_and_the_openapi_description(server, checkpoint):
    status, info, _ = server.call("GET", "/info")
    assert status == 200
    _, _, cfg = load_model(checkpoint)
    assert (info["task"], info["source"], info["target"]) == ("translation", "de", "en")
    assert info["checkpoint"]["config"] == to_dict(cfg)
    assert {k: info["model"][k] for k in ("layers", "d_model", "d_ff", "heads", "tokenizer", "src_vocab")} == \
        {"layers": 1, "d_model": 32, "d_ff": 64, "heads": 4, "tokenizer": "sentencepiece", "src_vocab": 500}
    assert info["decoding"]["beam_size"] == 5
    assert info["limits"] == {"max_chars": 4000, "max_sentences": 40, "max_body_bytes": 20000, "max_beam_size": 16,
                              "max_attention_tokens": 128}
    assert server.call("GET", "/languages")[1] == [{"code": "de", "name": "German", "targets": ["en"]}]
    status, health, _ = server.call("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    status, spec, _ = server.call("GET", "/openapi.json")
    assert status == 200
    paths = spec["paths"]
    assert {"/translate", "/attention", "/info", "/health", "/languages"} <= set(paths)
    for path in ("/translate", "/attention"):
        responses = paths[path]["post"]["responses"]
        # Errors are documented as they are sent: {"error": ...}, not FastAPI's default shape.
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        assert {"400", "413", "415", "503"} <= set(responses)
    request = spec["components"]["schemas"]["TranslateRequest"]
    assert set(request["properties"]) == {"q", "source", "target", "format", "beam_size", "alternatives"}
    assert request["additionalProperties"] is False
    status, page, _ = server.call("GET", "/")
    assert status == 200 and b'src="static/app.js"' in page
    for name in ("app.js", "style.css"):
        assert server.call("GET", f"/static/{name}")[0] == 200


BAD_REQUESTS = [
    # (path, JSON body or raw bytes, extra headers, status, words the error must hold)
    ("/translate", b'{"q": "Hallo"', {"Content-Type": "application/json"}, 400, "not valid JSON"),
    ("/translate", b"q=Hallo", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
    ("/translate", [1, 2], None, 422, "JSON object"),
    ("/translate", {}, None, 422, "'q' is required"),
    ("/translate", {"q": 5}, None, 422, "'q' must be a string or a list of strings"),
    ("/translate", {"q": ["Hallo", 3]}, None, 422, "'q' must be a string or a list of strings"),
    ("/translate", {"q": "Hallo", "beam_size": "5"}, None, 422, "'beam_size'"),
    ("/translate", {"q": "Hallo", "beam_size": 0}, None, 422, "'beam_size'"),
    ("/translate", {"q": "Hallo", "beam_size": 17}, None, 422, "limit of 16"),
    ("/translate", {"q": "Hallo", "beam_size": 3, "alternatives": 3}, None, 422, "at least 4"),
    ("/translate", {"q": "Hallo", "alternatives": -1}, None, 422, "'alternatives'"),
    ("/translate", {"q": "Hallo", "lang": "de"}, None, 422, "unknown field 'lang'"),
    ("/translate", {"q": ""}, None, 422, "'q' is empty"),
    ("/translate", {"q": "  \n "}, None, 422, "'q' is empty"),
    ("/translate", {"q": []}, None, 422, "'q' is an empty list"),
    ("/translate", {"q": ["Hallo", ""]}, None, 422, "'q[1]' is empty"),
    ("/translate", {"q": "Hallo " * 700}, None, 413, "limit is 4000"),
    ("/translate", {"q": ["Hallo"] * 41}, None, 413, "limit is 40"),
    ("/translate", {"q": "Hallo", "source": "fr"}, None, 422, "de -> en only"),
    ("/translate", {"q": "Hallo", "source": "de", "target": "fr"}, None, 422, "not de -> fr"),
    ("/translate", {"q": "Hallo", "format": "html"}, None, 422, "'format'"),
    ("/attention", {"q": ["Hallo"]}, None, 422, "'q'"),
    ("/attention", {"q": "Hallo", "alternatives": 2}, None, 422, "unknown field 'alternatives'"),
    ("/attention", {"q": "Hallo " * 200}, None, 413, "/attention takes sentences of at most 128"),
    ("/translate", {"q": "x" * 30000}, None, 413, "over this server's limit of 20000 bytes"),
]


def test_bad_requests_get_a_4xx_that_says_what_is_wrong_and_the_server_goes_on(server, translators):
    for path, body, headers, status, words in BAD_REQUESTS:
        if isinstance(body, bytes):
            got, answer, _ = server.call("POST", path, data=body, headers=headers)
        else:
            got, answer, _ = server.call("POST", path, body)
        assert (got, isinstance(answer, dict)) == (status, True), (path, body, answer)
        assert set(answer) == {"error"} and words in answer["error"], (path, body, answer)
    # A body over the limit sent in chunks (no Content-Length) is refused once the limit passes.
    chunks = (b'{"q": "' if i == 0 else b"x" * 1000 for i in range(30))
    got, answer, _ = server.call("POST", "/translate", data=chunks,
                                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    assert got == 413 and "20000 bytes" in answer["error"]
    assert server.call("GET", "/translate")[:2] == (405, {"error": "Method Not Allowed"})
    assert server.call("GET", "/nowhere")[:2] == (404, {"error": "Not Found"})
    assert server.translate("Ein Hund.")["translatedText"] == translators[5].translate(["Ein Hund."])[0]
    assert server.proc.poll() is None


def test_sigterm_lets_the_request_in_flight_finish(checkpoint, translators, sentences, tmp_path):
    # A request waits 1 s in the batcher for company: SIGTERM comes while it waits.
    server = Server(checkpoint, tmp_path / "server.log", "--batch-wait-ms", "1000")
    answers = []
    client = threading.Thread(target=lambda: answers.append(server.call("POST", "/translate", {"q": sentences[0]})))
    try:
        client.start()
        deadline = time.monotonic() + 30
        while server.call("GET", "/health")[1]["batching"]["queued"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        client.join(60)
        code = server.proc.wait(60)
    finally:
        server.stop()
    log = server.log.read_text(encoding="utf-8")
    assert code in (0, -signal.SIGTERM), log
    assert len(answers) == 1, log
    status, body, _ = answers[0]
    assert status == 200 and body["translatedText"] == translators[5].translate(sentences[:1])[0]
    assert "Shutting down" in log and "Traceback" not in log


def test_a_copy_task_checkpoint_translates_its_symbols_and_refuses_languages(copy_checkpoint, tmp_path):
    server = Server(copy_checkpoint, tmp_path / "server.log")
    try:
        info = server.call("GET", "/info")[1]
        assert (info["task"], info["source"], info["target"]) == ("copy", "ids", "ids")
        expected = Translator.from_checkpoint(copy_checkpoint, device="cpu").translate(["1 2 3 4 5 6 7"])
        assert server.translate("1 2 3 4 5 6 7")["translatedText"] == expected[0]
        status, answer, _ = server.call("POST", "/translate", {"q": "1 2 3", "source": "de", "target": "en"})
        assert status == 422 and "ids -> ids only (the copy task's symbols), not de -> en" in answer["error"]
        status, answer, _ = server.call("POST", "/translate", {"q": "1 zwei 3"})
        assert status == 422 and "'zwei' is not a symbol of the copy task" in answer["error"]
    finally:
        server.stop()


def test_the_command_reports_a_bad_checkpoint_port_and_device(tmp_path, checkpoint):
    result = subprocess.run([sys.executable, "-m", "transformer.serve", "--checkpoint", str(tmp_path / "none.pt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "error:" in result.stderr and "no such checkpoint file" in result.stderr
    result = subprocess.run([sys.executable, "-m", "transformer.serve", "--checkpoint", str(checkpoint),
                             "--port", "70000"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--port" in result.stderr
    result = subprocess.run([sys.executable, "-m", "transformer.serve", "--checkpoint", str(checkpoint),
                             "--device", "tpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "error: --device: unknown device 'tpu'" in result.stderr


# -- the page, in a real browser -------------------------------------------------------


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths: $CHROME_BIN / $CHROMEDRIVER, else Debian's chromium and chromium-driver."""
    browser = os.environ.get("CHROME_BIN") or next(
        (p for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
         if (p := shutil.which(name))), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_the_page_translates_as_you_type_and_shows_the_attention(server, sentences):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium: "
                                    "pip install -e '.[test]'")
    found = find_chromium()
    if found is None:
        pytest.skip("no Chromium and chromedriver found (apt-get install chromium chromium-driver, "
                    "or set CHROME_BIN and CHROMEDRIVER)")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's errors, read at the end
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=found[1]))
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "layers" in d.find_element(By.ID, "model").text)
        sentence = sentences[1]
        # What the page asks for by default: the server's beam and two alternatives.
        assert Select(driver.find_element(By.ID, "beam")).first_selected_option.get_attribute("value") == "5"
        assert Select(driver.find_element(By.ID, "alternatives")).first_selected_option.get_attribute("value") == "2"
        expected = server.translate([sentence], beam_size=5, alternatives=2)
        attention = server.call("POST", "/attention", {"q": sentence, "beam_size": 5})[1]
        driver.find_element(By.ID, "source").send_keys(sentence)
        wait.until(lambda d: d.find_element(By.ID, "translation").text == expected["translatedText"][0])
        items = driver.find_elements(By.CSS_SELECTOR, "#alternatives-list .text")
        assert [i.text for i in items] == expected["alternatives"][0]

        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#queries .token"))
                   == len(attention["target_tokens"]))
        queries = driver.find_elements(By.CSS_SELECTOR, "#queries .token")
        keys = driver.find_elements(By.CSS_SELECTOR, "#keys .token")
        assert [q.text for q in queries] == attention["target_tokens"]
        assert [k.text for k in keys] == attention["source_tokens"]
        cells = driver.find_elements(By.CSS_SELECTOR, "#heatmap tbody td")
        assert len(cells) == len(queries) * len(keys)

        def lit(elements):
            return [float(e.get_attribute("data-weight")) for e in elements]

        # Hovering target token 1 lights the source tokens with its row of head 1, layer 1...
        ActionChains(driver).move_to_element(queries[1]).perform()
        assert lit(keys) == pytest.approx(attention["encoder_decoder"][0][0][1], abs=1e-4)
        # ... of head 2 once it is chosen; and a source token lights its column.
        Select(driver.find_element(By.ID, "head")).select_by_value("1")
        queries = driver.find_elements(By.CSS_SELECTOR, "#queries .token")
        keys = driver.find_elements(By.CSS_SELECTOR, "#keys .token")
        ActionChains(driver).move_to_element(queries[1]).perform()
        assert lit(keys) == pytest.approx(attention["encoder_decoder"][0][1][1], abs=1e-4)
        ActionChains(driver).move_to_element(keys[0]).perform()
        assert lit(queries) == pytest.approx([row[0] for row in attention["encoder_decoder"][0][1]], abs=1e-4)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_an_exported_model_serves_greedy_what_the_checkpoint_serves(checkpoint, translators, sentences, tmp_path):
    """The same server on the model exported to CTranslate2: greedy translations equal the
    checkpoint's (the export's own tests check the engine against our decoder); /info names
    the engine, /attention refuses clearly."""
    pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install -e \".[export]\")")
    exported = tmp_path / "exported"
    result = subprocess.run([sys.executable, "-m", "transformer.export", str(checkpoint), str(exported)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    s = Server(exported, tmp_path / "server.log", "--beam-size", "1")
    try:
        assert s.translate(sentences)["translatedText"] == translators[1].translate(sentences)
        assert s.call("GET", "/info")[1]["model"]["engine"] == "ctranslate2"
        status, body, _ = s.call("POST", "/attention", {"q": sentences[0]})
        assert status == 422 and "serve the checkpoint" in body["error"]
    finally:
        s.stop()
