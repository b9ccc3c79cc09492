"""One scorer of the reward service: ``workers`` single-worker pools for one (verifier, options).

Items of all requests for that configuration wait in one queue; one thread per pool takes them
one at a time, so a hung item holds back only its own request and no worker idles while items
wait. Each item carries an asyncio future, settled on the event loop's thread
(`rlkit.reward.service.RewardService` awaits them).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass

from rlkit.reward.pool import VerifierPool
from rlkit.reward.verifiers import Score


class ScorerFailed(Exception):
    """A scorer's workers could not start: the request is answered 500."""


@dataclass(eq=False)
class Job:
    """One item on its way through a scorer; its future is settled on the event loop's thread."""

    response: str
    reference: str
    future: asyncio.Future
    abandoned: bool = False  # the request gave up (client gone, shutdown, a sibling failed): skip it

    def settle(self, score: Score | None = None, error: Exception | None = None) -> None:
        """Called from a scorer thread."""
        try:
            self.future.get_loop().call_soon_threadsafe(settle, self.future, score, error)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass


def settle(future: asyncio.Future, score: Score | None, error: Exception | None) -> None:
    """Give ``future`` its score or error unless it is done (event loop thread)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(score)


class Scorer:
    """``workers`` single-worker pools for one (verifier, options), fed item by item from one queue."""

    def __init__(self, verifier: str, options: dict, *, workers: int, timeout_s: float, startup_timeout_s: float):
        self.verifier = verifier
        self.options = options
        self.failure: str | None = None  # set once the workers could not start; the scorer is then retired
        self.requests = 0  # requests using it now (event loop thread); only idle scorers are evicted
        self.last_used = time.monotonic()
        self.pools = [
            VerifierPool(verifier, num_workers=1, timeout_s=timeout_s, options=options,
                         startup_timeout_s=startup_timeout_s)
            for _ in range(workers)
        ]
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._drive, args=(pool,), name=f"reward-{verifier}-{i}", daemon=True)
            for i, pool in enumerate(self.pools)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    @property
    def restarts(self) -> int:
        return sum(pool.stats["restarts"] for pool in self.pools)

    def _drive(self, pool: VerifierPool) -> None:
        while (job := self._queue.get()) is not None:
            if job.abandoned:
                continue
            if self.failure is not None:
                job.settle(error=ScorerFailed(self.failure))
                continue
            try:
                [score] = pool.score([job.response], [job.reference])
            except Exception as err:  # the worker could not start; the pool has closed itself
                self.failure = f"verifier {self.verifier!r} could not start its workers: {err}"
                job.settle(error=ScorerFailed(self.failure))
            else:
                job.settle(score)

    def stop(self) -> None:
        """Kill the workers and ask the threads to exit (non-blocking). Items still running end unanswered:
        call it once their requests were answered or abandoned."""
        for _ in self._threads:
            self._queue.put(None)
        for pool in self.pools:
            pool.abort()

    def join(self) -> None:
        """Wait for the threads (each ends within about a second of ``stop``), then reap the workers."""
        for thread in self._threads:
            thread.join()
        for pool in self.pools:
            pool.close()
