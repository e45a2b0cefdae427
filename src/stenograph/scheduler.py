"""One queue in front of the model for every session and request: finals first, stale interims skipped.

Model calls run on a fixed pool of threads (CTranslate2 releases the GIL), so the pool size is the number of
concurrent model calls. Jobs wait in a priority heap rather than the executor's FIFO, so a streaming final
never queues behind a long batch file or a pile of interims, and an interim whose audio has moved on is
dropped before it costs anything.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from stenograph import metrics
from stenograph.errors import overloaded


class Priority(IntEnum):
    FINAL = 0
    BATCH = 1
    INTERIM = 2


class JobSkipped(Exception):
    """The job went stale while it waited (an interim superseded by newer audio)."""


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    fn: Callable[[], Any] = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)
    stale: Callable[[], bool] | None = field(compare=False)
    enqueued: float = field(compare=False)


class Scheduler:
    def __init__(self, workers: int, max_queued: int) -> None:
        self.max_queued = max_queued
        self._heap: list[_Job] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._running_interims = 0
        self._interim_slots = max(1, workers - 1)
        self._threads = [
            threading.Thread(target=self._worker, name=f"stenograph-model-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def depth_at_or_above(self, priority: Priority) -> int:
        """Jobs queued that would run before a new job of `priority` (used to thin interims under load)."""
        with self._cond:
            return sum(1 for j in self._heap if j.priority <= priority)

    async def run(
        self, fn: Callable[[], Any], priority: Priority, stale: Callable[[], bool] | None = None
    ) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            # Finals are never refused: they are bounded by the number of sessions, which is capped upstream.
            if priority != Priority.FINAL and len(self._heap) >= self.max_queued:
                metrics.job(Priority(priority).name.lower(), "rejected")
                raise overloaded("the transcription queue is full; retry shortly")
            heapq.heappush(
                self._heap, _Job(priority, next(self._seq), fn, future, loop, stale, time.monotonic())
            )
            metrics.queue_depth(len(self._heap))
            self._cond.notify()
        return await future

    def _runnable(self) -> bool:
        """Is there a job this worker may start? Interims may occupy all but one worker, so a final that
        arrives while interims are decoding never waits for one of them to finish."""
        if not self._heap:
            return False
        return self._heap[0].priority != Priority.INTERIM or self._running_interims < self._interim_slots

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._runnable():
                    self._cond.wait()
                if self._closed and not self._heap:
                    return
                job = heapq.heappop(self._heap)
                metrics.queue_depth(len(self._heap))
                if job.priority == Priority.INTERIM:
                    self._running_interims += 1
            try:
                self._execute(job)
            finally:
                if job.priority == Priority.INTERIM:
                    with self._cond:
                        self._running_interims -= 1
                        self._cond.notify()

    def _execute(self, job: _Job) -> None:
        started = time.monotonic()
        priority = Priority(job.priority).name.lower()
        if job.future.cancelled():
            return
        if job.stale is not None and job.stale():
            metrics.job(priority, "skipped", wait=started - job.enqueued)
            job.loop.call_soon_threadsafe(_set_exception, job.future, JobSkipped())
            return
        try:
            result = job.fn()
        except BaseException as exc:  # delivered to the awaiting coroutine, which owns error handling
            job.loop.call_soon_threadsafe(_set_exception, job.future, exc)
            outcome = "failed"
        else:
            job.loop.call_soon_threadsafe(_set_result, job.future, result)
            outcome = "completed"
        metrics.job(priority, outcome, wait=started - job.enqueued, run=time.monotonic() - started)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
