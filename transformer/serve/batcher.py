"""Requests that arrive together, decoded together: the server's one owner of the model.

Request handlers ``submit`` source id lists with their decoding options and get a
``concurrent.futures.Future``; decoding threads (``workers`` of them, each on its own
share of the CPU threads, set once when it starts) take jobs from one queue. A thread
that finds the queue non-empty waits until its oldest job has waited ``wait`` seconds
or the jobs queued fill ``batch_tokens`` padded source tokens, whichever comes first,
then decodes every queued job with the same options as one call, and resolves their
futures. Under load the oldest job has waited long enough already, so nothing waits
for nothing; alone, a request waits ``wait`` at most.

A job is decoded with others only when its options are the same (beam size, n-best,
scores): those are one ``Translator.search`` call. What a job gets back does not
depend on the others (the batch's sentences are decoded independently, which
``tests/test_serve.py`` checks against each sentence decoded alone).

With a ``stream`` (greedy decoding, see ``transformer.inference.stream``), the jobs
whose options it takes are not gathered into batches: each decoding thread keeps a
stream, and queued sentences join its rows between two decoding steps and leave as
soon as they end. A thread takes queued jobs for its stream up to an even share of all
the sentences in flight, so two threads decode about as many rows each. Other jobs are
gathered and decoded as above, between two steps (without waiting for others while
the stream has rows).

``close`` refuses new jobs, lets the threads finish every job already queued, and
joins them: a server that stops lets its in-flight requests finish.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class Closed(RuntimeError):
    """The batcher is shutting down and takes no new jobs."""


@dataclass(frozen=True)
class Options:
    """How a job's sentences are decoded; jobs with equal options share a batch."""

    beam_size: int
    nbest: int = 1
    scores: bool = False  # greedy hypotheses are scored only when asked (it costs a pass)


@dataclass
class _Job:
    future: Future
    arrived: float  # time.monotonic()
    options: Hashable | None = None  # None: a call, run on its own
    sources: Sequence[list[int]] = ()
    call: Callable[[], Any] | None = None

    @property
    def longest(self) -> int:
        return max((len(s) for s in self.sources), default=0)


@dataclass
class Stats:
    """What the batcher has done since it started (for ``/health``)."""

    jobs: int = 0  # submitted jobs decoded (calls aside)
    sentences: int = 0
    batches: int = 0  # Translator.search calls
    steps: int = 0  # stream steps
    calls: int = 0
    errors: int = 0
    largest_batch: int = 0  # sentences
    queued: int = 0  # jobs waiting now
    busy: int = 0  # threads decoding a batch now
    streaming: int = 0  # sentences in the streams now

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Batcher:
    """Gather jobs for a few milliseconds, decode those with equal options together.

    Args:
        decode: ``decode(options, sources) -> one result per source``; run in a
            decoding thread, on the jobs' sources concatenated.
        workers: decoding threads; each takes its own batches.
        threads: torch threads of each decoding thread (``torch.set_num_threads``,
            called once in each when it starts; None leaves torch's default).
        wait: seconds a job may wait for others to join its batch.
        batch_tokens: a batch is decoded at once when its padded source tokens
            (sentences × the longest) would pass this.
        batch_size: sentences in a batch, at most (a larger job goes alone); also the
            rows of a stream, at most.
        stream: makes a stream (called once in each decoding thread): ``add(key,
            source)``, ``step() -> [(key, result), ...]`` for the sentences that ended,
            ``len()`` the sentences in it.
        streams: whether a job with these options goes to the stream.
    """

    decode: Callable[[Hashable, list[list[int]]], list]
    workers: int = 1
    threads: int | None = None
    wait: float = 0.005
    batch_tokens: int = 8192
    batch_size: int = 256
    stream: Callable[[], Any] | None = None
    streams: Callable[[Hashable], bool] = lambda options: False
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._gathering = 0  # threads waiting in _take (for sharing a burst between them)
        self._in_streams = [0] * self.workers  # sentences in each thread's stream
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"decode-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, sources: Sequence[list[int]], options: Hashable) -> Future:
        """Queue sentences (source ids) for decoding; the future gives one result each."""
        return self._put(_Job(Future(), time.monotonic(), options, list(sources)))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` in a decoding thread on its own (work on the model outside batches)."""
        return self._put(_Job(Future(), time.monotonic(), call=fn))

    def _put(self, job: _Job) -> Future:
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            self._queue.append(job)
            self.stats.queued = len(self._queue)
            self._cond.notify_all()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones, and stop the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    @property
    def closing(self) -> bool:
        return self._closing

    def _run(self, worker: int) -> None:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)  # this thread's, once
        if self.stream is not None:
            self._run_stream(worker)
            return
        while (taken := self._take(worker)) is not None:
            self._process(taken[1])  # without a stream, every job is batched

    def _run_stream(self, worker: int) -> None:
        """Step this thread's stream while it has sentences; take queued jobs between steps."""
        stream = self.stream()
        jobs: dict[int, tuple[_Job, list]] = {}  # id(job) -> the job and its results so far
        left: dict[int, int] = {}  # id(job) -> its sentences not ended yet
        while (taken := self._take(worker, len(stream))) is not None:
            streamed, other = taken
            for job in streamed:
                if not job.future.set_running_or_notify_cancel():
                    continue
                jobs[id(job)], left[id(job)] = (job, [None] * len(job.sources)), len(job.sources)
                for i, source in enumerate(job.sources):
                    stream.add((id(job), i), source)
            if other:
                self._process(other)
            if not len(stream):
                continue
            try:
                ended = stream.step()
            except Exception as e:  # the thread lives on with a new stream; its jobs fail
                log.exception("decoding failed")
                for job, _ in jobs.values():
                    job.future.set_exception(e)
                with self._cond:
                    self.stats.errors += 1
                    self._in_streams[worker] = 0
                jobs.clear()
                left.clear()
                stream = self.stream()
                continue
            done = []
            for (key, i), result in ended:
                jobs[key][1][i] = result
                left[key] -= 1
                if not left[key]:
                    done.append(jobs.pop(key))
                    del left[key]
            with self._cond:
                self.stats.steps += 1
                self._in_streams[worker] = len(stream)
                self.stats.streaming = sum(self._in_streams)
                for job, results in done:
                    self.stats.jobs += 1
                    self.stats.sentences += len(results)
            for job, results in done:
                job.future.set_result(results)

    def _take(self, worker: int, in_stream: int = 0) -> tuple[list[_Job], list[_Job]] | None:
        """Jobs for this thread's stream (up to its share of the sentences in flight), and
        the next batch of other jobs: the oldest and the queued jobs with its options, once
        the oldest has waited ``wait`` or they fill the budget (a call alone, at once).
        None when closed with nothing queued or streaming. Waits only while the thread's
        stream is empty (``in_stream`` sentences)."""
        with self._cond:
            self._in_streams[worker] = in_stream
            self._gathering += 1
            try:
                while True:
                    if not self._queue:
                        if in_stream:
                            return [], []
                        if self._closing:
                            return None
                        self._cond.wait()
                        continue
                    first = self._queue[0]
                    if self._streamed(first):
                        return self._stream_share(worker, in_stream), []
                    if first.call is not None:
                        return [], [self._pop(first)]
                    same = [j for j in self._queue if j.options == first.options]
                    left = first.arrived + self.wait - time.monotonic()
                    if in_stream or self._closing or left <= 0 or self._full(same):
                        return [], self._split(same)
                    self._cond.wait(left)
            finally:
                self._gathering -= 1
                self.stats.queued = len(self._queue)

    def _streamed(self, job: _Job) -> bool:
        """Whether ``job`` goes to a stream (there is one, and it takes these options)."""
        return self.stream is not None and job.call is None and self.streams(job.options)

    def _stream_share(self, worker: int, in_stream: int) -> list[_Job]:
        """The queued stream jobs, oldest first, that bring this thread's stream up to an
        even share of all the sentences in flight (one job at least when it is empty),
        within ``batch_size``."""
        queued = [j for j in self._queue if self._streamed(j)]
        total = sum(self._in_streams) + sum(len(j.sources) for j in queued)
        share = min(self.batch_size, math.ceil(total / self.workers))
        taken: list[_Job] = []
        for job in queued:
            if (taken or in_stream) and in_stream + len(job.sources) > share:
                break
            taken.append(self._pop(job))
            in_stream += len(job.sources)
        self._in_streams[worker] = in_stream
        return taken

    def _full(self, jobs: list[_Job]) -> bool:
        sentences = sum(len(j.sources) for j in jobs)
        return sentences >= self.batch_size or sentences * max(j.longest for j in jobs) >= self.batch_tokens

    def _split(self, same: list[_Job]) -> list[_Job]:
        """Take the oldest of ``same`` within the budget, leaving an even share of a burst
        to each other thread that is waiting for work (one batch per core)."""
        share = math.ceil(sum(len(j.sources) for j in same) / max(1, self._gathering))
        taken: list[_Job] = []
        sentences = longest = 0
        for job in same:
            n, width = sentences + len(job.sources), max(longest, job.longest)
            if taken and (n > min(share, self.batch_size) or n * width > self.batch_tokens):
                break
            taken.append(self._pop(job))
            sentences, longest = n, width
        return taken

    def _pop(self, job: _Job) -> _Job:
        self._queue.remove(job)
        return job

    def _process(self, jobs: list[_Job]) -> None:
        # A job whose request went away (its future cancelled) is not decoded.
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        with self._cond:
            self.stats.busy += 1
        try:
            if jobs[0].call is not None:
                self._finish(jobs, lambda: [jobs[0].call()], calls=1)
            else:
                sources = [s for j in jobs for s in j.sources]
                self._finish(jobs, lambda: self.decode(jobs[0].options, sources), sentences=len(sources))
        finally:
            with self._cond:
                self.stats.busy -= 1

    def _finish(self, jobs: list[_Job], work: Callable[[], list], calls: int = 0, sentences: int = 0) -> None:
        """Run ``work`` and hand each job its part of the results (or the error)."""
        try:
            results = work()
        except Exception as e:  # the thread lives on, whatever one batch does
            log.exception("decoding failed")
            with self._cond:
                self.stats.errors += 1
            for job in jobs:
                job.future.set_exception(e)
            return
        with self._cond:
            if calls:
                self.stats.calls += calls
            else:
                self.stats.jobs += len(jobs)
                self.stats.sentences += sentences
                self.stats.batches += 1
                self.stats.largest_batch = max(self.stats.largest_batch, sentences)
        if calls:
            jobs[0].future.set_result(results[0])
            return
        start = 0
        for job in jobs:
            job.future.set_result(results[start : start + len(job.sources)])
            start += len(job.sources)
