"""The verifier-reward service's core: scorers per (verifier, options), limits, metrics, shutdown.

The HTTP layer over it is ``rlkit.reward.app``; ``rlkit.reward.serve`` runs both.

Scheduling: one scorer per (verifier, options), created on first use and kept until
``max_pools`` are live and another configuration is asked for: then the least recently used
idle one is stopped (LRU), so no client can lock others out by naming many options. A scorer
(``rlkit.reward.service_scorer``) owns ``workers`` single-worker ``VerifierPool``s, each
driven by a thread that takes items one at a time from the scorer's queue. Items of
concurrent requests therefore share the workers item by item: a hung item holds back only
its own request (until its timeout), never the other requests, and no worker idles while
items wait. Timeouts, crashes and worker replacement are the pool's.

Only registered verifiers (``math``, ``gsm8k``) and import paths allowed at start-up can
be named by a request: an arbitrary ``module:function`` from the network would be remote
code execution.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

from rlkit.reward.requests import Refusal
from rlkit.reward.service_metrics import ServiceMetrics
from rlkit.reward.service_scorer import Job, Scorer, settle
from rlkit.reward.verifier_options import check_options
from rlkit.reward.verifiers import VERIFIERS, Score

log = logging.getLogger("rlkit.reward.service")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


@dataclass(frozen=True)
class ServiceSettings:
    """What the service runs and what it accepts.

    workers: verifier worker processes per (verifier, options) configuration.
    timeout_s: per-item wall-clock limit; a timed-out item is unscorable (reward null).
    startup_timeout_s: limit for a worker's start-up (imports, ``prepare``).
    token: bearer token every /score and /metrics request must carry; None: no auth.
    allowed_hosts: the Host header names (without port) /score and /metrics answer to; empty: any.
        ``rlkit.reward.serve`` sets ``LOOPBACK_HOSTS`` when it binds a loopback address, since a web
        page that reaches the port through DNS rebinding sends its own name.
    extra_verifiers: import paths (``pkg.mod:fn``) requests may name besides the registered verifiers.
    preload: verifiers whose workers start with the service (default options), so the first request does not wait.
    max_request_bytes / max_items / max_chars: limits on one request's body, its item count,
        and each response's or reference's length in characters (over: 413).
    max_queued_items: items waiting or running across all requests (over: 503, retry later).
    max_pools: live (verifier, options) configurations, each ``workers`` processes; past it the least
        recently used idle one is stopped (503 if all are busy; 422 for one request naming more).
    """

    workers: int = 2
    timeout_s: float = 10.0
    startup_timeout_s: float = 120.0
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    extra_verifiers: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()
    max_request_bytes: int = 32 * 2**20
    max_items: int = 4096
    max_chars: int = 200_000
    max_queued_items: int = 65_536
    max_pools: int = 8

    def __post_init__(self):
        for name in ("workers", "max_request_bytes", "max_items", "max_chars", "max_queued_items", "max_pools"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.max_queued_items < self.max_items:
            raise ValueError(f"max_queued_items ({self.max_queued_items}) must be >= max_items ({self.max_items}), "
                             f"or a full request could never be queued")
        if self.token is not None and not (self.token.isascii() and self.token.isprintable() and self.token.strip()):
            raise ValueError("the bearer token must be non-empty printable ASCII (it travels in an HTTP header)")
        for path in self.extra_verifiers:
            if ":" not in path:
                raise ValueError(f"extra verifier {path!r} is not an import path; "
                                 f"write it as 'package.module:function'")
            VERIFIERS.get(path)  # a typo fails at start-up (KeyError naming the import problem), not per request
        allowed = set(VERIFIERS.names()) | set(self.extra_verifiers)
        for name in self.preload:
            if name not in allowed:
                raise ValueError(f"cannot preload {name!r}: not a registered verifier or an allowed import path")


class ShuttingDown(Exception):
    """The service is draining: the request is answered 503."""


@dataclass(eq=False)
class _InFlight:
    jobs: list[Job]


class RewardService:
    """Scorers, limits, metrics and shutdown; the HTTP layer is ``rlkit.reward.app.create_app``."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.verifiers = tuple(VERIFIERS.names()) + tuple(v for v in settings.extra_verifiers if v not in VERIFIERS)
        self.metrics = ServiceMetrics()
        self.draining = False
        self.queued = 0  # items submitted and not yet answered
        self._scorers: dict[tuple[str, str], Scorer] = {}
        self._inflight: set[_InFlight] = set()
        self._closed = False

    # ------------------------------------------------------------------ scoring

    def check_verifier(self, verifier: str, options: dict, where: str) -> None:
        """Refuse (422) a verifier this service does not offer or options it cannot take."""
        if verifier not in self.verifiers:
            raise Refusal(422, f"{where}: unknown verifier {verifier!r}; this service scores with "
                               f"{', '.join(self.verifiers)} (start it with --verifier package.module:function "
                               f"to allow another)")
        try:
            check_options(verifier, VERIFIERS.get(verifier), options)
        except TypeError as err:
            raise Refusal(422, f"{where}: {err}") from err

    def scorer(self, verifier: str, options: dict, key: str) -> Scorer:
        """The scorer for (verifier, options with canonical JSON ``key``), started on first use; at
        ``max_pools`` the least recently used idle scorer makes room (503 if none is idle)."""
        if self._closed:
            raise ShuttingDown()
        scorer = self._scorers.get((verifier, key))
        if scorer is not None and scorer.failure is not None:
            self._retire(verifier, key)
            scorer = None
        if scorer is None:
            if len(self._scorers) >= self.settings.max_pools:
                self._evict_one()
            settings = self.settings
            scorer = self._scorers[verifier, key] = Scorer(verifier, options, workers=settings.workers,
                                                           timeout_s=settings.timeout_s,
                                                           startup_timeout_s=settings.startup_timeout_s)
        scorer.last_used = time.monotonic()
        return scorer

    def _evict_one(self) -> None:
        idle = [(scorer.last_used, id_) for id_, scorer in self._scorers.items() if scorer.requests == 0]
        if not idle:
            raise Refusal(503, f"service busy: all {len(self._scorers)} verifier configurations (--max-pools "
                               f"{self.settings.max_pools}) are scoring; retry shortly", {"Retry-After": "1"})
        _, (verifier, key) = min(idle)
        log.info("stopping the least recently used idle pool (%s, options %s) to make room (--max-pools %d)",
                 verifier, key, self.settings.max_pools)
        self._retire(verifier, key)

    async def score(self, items: list[tuple[str, str, str, dict, str]], receive=None) -> list[Score] | None:
        """Score validated ``(response, reference, verifier, options, options_key)`` items, in order.

        Returns None if ``receive`` (the ASGI receive channel) reports that the client left
        first; its items still queued are then skipped. Raises ``ShuttingDown`` or
        ``ScorerFailed`` when items cannot be scored.
        """
        if self.draining or self._closed:
            raise ShuttingDown()
        if not items:
            return []
        if self.queued + len(items) > self.settings.max_queued_items:
            raise Refusal(503, f"service busy: {self.queued} items already queued (--max-queued-items "
                               f"{self.settings.max_queued_items}); retry shortly", {"Retry-After": "1"})
        scorers: dict[tuple[str, str], Scorer] = {}
        try:
            for _, _, verifier, options, key in items:
                if (verifier, key) not in scorers:
                    scorer = scorers[verifier, key] = self.scorer(verifier, options, key)
                    scorer.requests += 1  # in use: not evicted by the next configuration of this request
            return await self._run(items, scorers, receive)
        finally:
            for scorer in scorers.values():
                scorer.requests -= 1

    async def _run(self, items: list[tuple[str, str, str, dict, str]], scorers: dict[tuple[str, str], Scorer],
                   receive) -> list[Score] | None:
        """``score`` once the scorers are held: queue the items, await them or the client's departure."""
        loop = asyncio.get_running_loop()
        jobs = [Job(response, reference, loop.create_future()) for response, reference, *_ in items]
        inflight = _InFlight(jobs)
        self._inflight.add(inflight)
        self.queued += len(jobs)
        gathered = asyncio.gather(*(job.future for job in jobs))
        watcher = asyncio.ensure_future(_wait_disconnect(receive)) if receive is not None else None
        try:
            for job, (_, _, verifier, _, key) in zip(jobs, items):
                scorers[verifier, key].submit(job)
            if watcher is None:
                return await gathered
            done, _ = await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if gathered in done:
                return gathered.result()
            self.metrics.cancelled_items += sum(not job.future.done() for job in jobs)
            return None
        finally:
            if watcher is not None:
                watcher.cancel()
            for job in jobs:
                job.abandoned = True  # no-op for finished items; queued ones are skipped
            if not gathered.done():
                gathered.cancel()
            self._inflight.discard(inflight)
            self.queued -= len(jobs)

    # ------------------------------------------------------------------ lifecycle

    def preload(self) -> None:
        for verifier in self.settings.preload:
            self.scorer(verifier, {}, "{}")

    async def drain(self, grace_s: float) -> None:
        """Stop taking work; give in-flight requests ``grace_s`` to finish, then answer the rest with 503."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.abandon_all()

    def abandon_all(self) -> None:
        """Fail every unanswered item with ShuttingDown (event loop thread)."""
        for inflight in list(self._inflight):
            for job in inflight.jobs:
                job.abandoned = True
                settle(job.future, None, ShuttingDown())

    def close(self) -> None:
        """Stop every scorer and kill its worker processes; items still running are dropped, so call it once
        requests were answered or abandoned. Blocks about a second. Idempotent."""
        self._closed = True
        scorers = list(self._scorers.values())
        self._scorers.clear()
        for scorer in scorers:
            scorer.stop()
        for scorer in scorers:
            scorer.join()

    def _retire(self, verifier: str, key: str) -> None:
        scorer = self._scorers.pop((verifier, key))
        self.metrics.retired_restarts[verifier] += scorer.restarts
        scorer.stop()
        threading.Thread(target=scorer.join, name="reward-retire", daemon=True).start()

    # ------------------------------------------------------------------ metrics

    def render_metrics(self) -> str:
        restarts = Counter(self.metrics.retired_restarts)
        for (verifier, _), scorer in self._scorers.items():
            restarts[verifier] += scorer.restarts
        workers = sum(len(scorer.pools) for scorer in self._scorers.values())
        return self.metrics.render(restarts, {"queued_items": self.queued, "inflight_requests": len(self._inflight),
                                              "pools": len(self._scorers), "workers": workers})

    def pools(self) -> list[dict]:
        return [dict(verifier=v, options=json.loads(k), workers=len(s.pools)) for (v, k), s in self._scorers.items()]


async def _wait_disconnect(receive) -> None:
    """Return once the client disconnects (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
