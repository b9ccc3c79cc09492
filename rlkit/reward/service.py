"""The verifier-reward service: batch scoring over HTTP on top of ``VerifierPool``.

Endpoints (JSON bodies; errors are ``{"detail": "<what is wrong and how to fix it>"}``):

- ``POST /score``: ``{"verifier"?, "options"?, "items": [{"response", "reference", "verifier"?, "options"?}]}``
  -> ``{"results": [{"reward", "correct", "extracted", "error"}]}`` in item order. Top-level
  ``verifier``/``options`` are defaults for items that omit them. ``reward`` is ``null`` when
  the item is unscorable (``error`` says why: ``timeout``, ``worker_crash``, ...). An empty
  ``items`` list with a top-level verifier checks the verifier and options and starts its workers.
- ``GET /health``: liveness (200 while the process serves).
- ``GET /ready``: readiness (200 while accepting work, 503 while shutting down).
- ``GET /metrics``: Prometheus text format.

POST bodies must be ``Content-Type: application/json`` (415 otherwise): a web page can send
``text/plain`` or form posts to a loopback port without the browser asking first.

Scheduling: one scorer per (verifier, options), created on first use and kept until
``max_pools`` are live and another configuration is asked for: then the least recently used
idle one is stopped (LRU), so no client can lock others out by naming many options. A scorer
owns ``workers`` single-worker ``VerifierPool``s, each driven by a thread that takes items
one at a time from the scorer's queue. Items of concurrent requests therefore share the
workers item by item: a hung item holds back only its own request (until its timeout),
never the other requests, and no worker idles while items wait. Timeouts, crashes and
worker replacement are the pool's.

Only registered verifiers (``math``, ``gsm8k``) and import paths allowed at start-up can
be named by a request: an arbitrary ``module:function`` from the network would be remote
code execution.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from rlkit.reward.pool import VerifierPool
from rlkit.reward.verifiers import VERIFIERS, Score, check_options

log = logging.getLogger("rlkit.reward.service")

# Request latency histogram buckets (seconds), Prometheus-style upper bounds.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# Set in a request's ASGI scope by the server (rlkit.reward.serve) when it closes the connection before the
# body arrived: (status counted in the metrics, reason logged).
CLOSED_BY_SERVER = "rlkit.closed_by_server"
_TOP_FIELDS = ("items", "verifier", "options")
_ITEM_FIELDS = ("response", "reference", "verifier", "options")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


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


class Refusal(Exception):
    """A request the service answers with ``status`` and ``{"detail": detail}``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


class _ShuttingDown(Exception):
    pass


class _ScorerFailed(Exception):
    pass


@dataclass(eq=False)
class _Job:
    """One item on its way through a scorer; its future is settled on the event loop's thread."""

    response: str
    reference: str
    future: asyncio.Future
    abandoned: bool = False  # the request gave up (client gone, shutdown, a sibling failed): skip it

    def settle(self, score: Score | None = None, error: Exception | None = None) -> None:
        """Called from a scorer thread."""
        try:
            self.future.get_loop().call_soon_threadsafe(_settle, self.future, score, error)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass


def _settle(future: asyncio.Future, score: Score | None, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(score)


class _Scorer:
    """``workers`` single-worker pools for one (verifier, options), fed item by item from one queue."""

    def __init__(self, verifier: str, options: dict, settings: ServiceSettings):
        self.verifier = verifier
        self.options = options
        self.failure: str | None = None  # set once the workers could not start; the scorer is then retired
        self.requests = 0  # requests using it now (event loop thread); only idle scorers are evicted
        self.last_used = time.monotonic()
        self.pools = [
            VerifierPool(verifier, num_workers=1, timeout_s=settings.timeout_s, options=options,
                         startup_timeout_s=settings.startup_timeout_s)
            for _ in range(settings.workers)
        ]
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._drive, args=(pool,), name=f"reward-{verifier}-{i}", daemon=True)
            for i, pool in enumerate(self.pools)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: _Job) -> None:
        self._queue.put(job)

    @property
    def restarts(self) -> int:
        return sum(pool.stats["restarts"] for pool in self.pools)

    def _drive(self, pool: VerifierPool) -> None:
        while (job := self._queue.get()) is not None:
            if job.abandoned:
                continue
            if self.failure is not None:
                job.settle(error=_ScorerFailed(self.failure))
                continue
            try:
                [score] = pool.score([job.response], [job.reference])
            except Exception as err:  # the worker could not start; the pool has closed itself
                self.failure = f"verifier {self.verifier!r} could not start its workers: {err}"
                job.settle(error=_ScorerFailed(self.failure))
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


@dataclass(eq=False)
class _InFlight:
    jobs: list[_Job]


@dataclass
class _Metrics:
    """Counters kept on the event loop's thread; rendered in Prometheus text format."""

    requests: Counter = field(default_factory=Counter)  # status code -> count (POST /score)
    items: Counter = field(default_factory=Counter)  # (verifier, "scored" | "unscorable") -> count
    item_errors: Counter = field(default_factory=Counter)  # (verifier, error kind) -> count
    timeouts: Counter = field(default_factory=Counter)  # verifier -> count
    retired_restarts: Counter = field(default_factory=Counter)  # verifier -> restarts of scorers since retired
    cancelled_items: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))
    latency_sum_s: float = 0.0
    latency_count: int = 0

    def observe_request(self, status: int, seconds: float) -> None:
        self.requests[status] += 1
        self.latency_sum_s += seconds
        self.latency_count += 1
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.latency_buckets[i] += 1

    def observe_scores(self, verifier: str, scores: list[Score]) -> None:
        for score in scores:
            self.items[verifier, "scored" if score.reward is not None else "unscorable"] += 1
            if score.error is not None:
                kind = score.error.split(":", 1)[0]
                self.item_errors[verifier, kind] += 1
                if kind == "timeout":
                    self.timeouts[verifier] += 1


class RewardService:
    """Scorers, limits, metrics and shutdown; the HTTP layer is ``create_app``."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.verifiers = tuple(VERIFIERS.names()) + tuple(v for v in settings.extra_verifiers if v not in VERIFIERS)
        self.metrics = _Metrics()
        self.draining = False
        self.queued = 0  # items submitted and not yet answered
        self._scorers: dict[tuple[str, str], _Scorer] = {}
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

    def scorer(self, verifier: str, options: dict, key: str) -> _Scorer:
        """The scorer for (verifier, options with canonical JSON ``key``), started on first use; at
        ``max_pools`` the least recently used idle scorer makes room (503 if none is idle)."""
        if self._closed:
            raise _ShuttingDown()
        scorer = self._scorers.get((verifier, key))
        if scorer is not None and scorer.failure is not None:
            self._retire(verifier, key)
            scorer = None
        if scorer is None:
            if len(self._scorers) >= self.settings.max_pools:
                self._evict_one()
            scorer = self._scorers[verifier, key] = _Scorer(verifier, options, self.settings)
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
        first; its items still queued are then skipped. Raises ``_ShuttingDown`` or
        ``_ScorerFailed`` when items cannot be scored.
        """
        if self.draining or self._closed:
            raise _ShuttingDown()
        if not items:
            return []
        if self.queued + len(items) > self.settings.max_queued_items:
            raise Refusal(503, f"service busy: {self.queued} items already queued (--max-queued-items "
                               f"{self.settings.max_queued_items}); retry shortly", {"Retry-After": "1"})
        scorers: dict[tuple[str, str], _Scorer] = {}
        try:
            for _, _, verifier, options, key in items:
                if (verifier, key) not in scorers:
                    scorer = scorers[verifier, key] = self.scorer(verifier, options, key)
                    scorer.requests += 1  # in use: not evicted by the next configuration of this request
            return await self._run(items, scorers, receive)
        finally:
            for scorer in scorers.values():
                scorer.requests -= 1

    async def _run(self, items: list[tuple[str, str, str, dict, str]], scorers: dict[tuple[str, str], _Scorer],
                   receive) -> list[Score] | None:
        """``score`` once the scorers are held: queue the items, await them or the client's departure."""
        loop = asyncio.get_running_loop()
        jobs = [_Job(response, reference, loop.create_future()) for response, reference, *_ in items]
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
        """Fail every unanswered item with _ShuttingDown (event loop thread)."""
        for inflight in list(self._inflight):
            for job in inflight.jobs:
                job.abandoned = True
                _settle(job.future, None, _ShuttingDown())

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
        m = self.metrics
        restarts = Counter(m.retired_restarts)
        workers = 0
        for (verifier, _), scorer in self._scorers.items():
            restarts[verifier] += scorer.restarts
            workers += len(scorer.pools)
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        family("rlkit_reward_requests_total", "counter", "POST /score requests by HTTP status.",
               [(_labels(code=str(code)), n) for code, n in sorted(m.requests.items())])
        family("rlkit_reward_items_total", "counter",
               "Items answered, by verifier and outcome (scored: reward not null).",
               [(_labels(verifier=v, outcome=o), n) for (v, o), n in sorted(m.items.items())])
        family("rlkit_reward_item_errors_total", "counter",
               "Items answered with an error code (no_answer is scorable; the rest are unscorable).",
               [(_labels(verifier=v, error=e), n) for (v, e), n in sorted(m.item_errors.items())])
        family("rlkit_reward_timeouts_total", "counter", "Items that hit the per-item timeout.",
               [(_labels(verifier=v), n) for v, n in sorted(m.timeouts.items())])
        family("rlkit_reward_worker_restarts_total", "counter", "Worker processes replaced after a timeout or crash.",
               [(_labels(verifier=v), n) for v, n in sorted(restarts.items())])
        family("rlkit_reward_items_cancelled_total", "counter",
               "Items whose client left before they were answered (those still queued are skipped).",
               [("", m.cancelled_items)])
        cumulative = [(_labels(le=_number(bound)), n) for bound, n in zip(LATENCY_BUCKETS_S, m.latency_buckets)]
        lines.append("# HELP rlkit_reward_request_seconds POST /score latency (all statuses).")
        lines.append("# TYPE rlkit_reward_request_seconds histogram")
        lines.extend(f"rlkit_reward_request_seconds_bucket{labels} {n}" for labels, n in cumulative)
        lines.append(f'rlkit_reward_request_seconds_bucket{{le="+Inf"}} {m.latency_count}')
        lines.append(f"rlkit_reward_request_seconds_sum {_number(m.latency_sum_s)}")
        lines.append(f"rlkit_reward_request_seconds_count {m.latency_count}")
        family("rlkit_reward_queued_items", "gauge", "Items waiting or being scored.", [("", self.queued)])
        family("rlkit_reward_inflight_requests", "gauge", "Requests being scored.", [("", len(self._inflight))])
        family("rlkit_reward_pools", "gauge", "Live (verifier, options) configurations.", [("", len(self._scorers))])
        family("rlkit_reward_workers", "gauge", "Verifier worker processes configured.", [("", workers)])
        return "\n".join(lines) + "\n"

    def pools(self) -> list[dict]:
        return [dict(verifier=v, options=json.loads(k), workers=len(s.pools)) for (v, k), s in self._scorers.items()]


async def _wait_disconnect(receive) -> None:
    """Return once the client disconnects (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels.items()) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- request parsing


def _json_type(value: object) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) past ``limit`` bytes without reading further."""
    too_big = Refusal(413, f"request body exceeds {limit} bytes (--max-request-bytes); send fewer or shorter items "
                           f"per request (the client's batch_size)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> object:
    """Decoded JSON, or a 400 naming what is wrong with the bytes."""
    if not body.strip():
        raise Refusal(400, 'empty request body; send JSON {"verifier": ..., "items": [...]}')
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Refusal(400, f"request body is not valid UTF-8 (bad byte at offset {err.start}); "
                           f"encode the JSON as UTF-8")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise Refusal(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}")
    except ValueError as err:
        raise Refusal(400, f"malformed JSON: {err}")
    except RecursionError:
        raise Refusal(400, "malformed JSON: nested too deeply")


def parse_items(payload: object, service: RewardService) -> tuple[list[tuple[str, str, str, dict, str]], tuple | None]:
    """Validate a /score payload into ``(response, reference, verifier, options, options_key)`` items,
    and the top-level ``(verifier, options, options_key)`` default (None if the request names none).

    Refuses with 422 (wrong shape or types, unknown verifier, bad options) or 413 (limits).
    """
    settings = service.settings
    if not isinstance(payload, dict):
        raise Refusal(422, f'request body must be a JSON object {{"items": [...]}}, got {_json_type(payload)}')
    _check_fields(payload, _TOP_FIELDS, "request")
    if "items" not in payload:
        raise Refusal(422, 'request has no "items"; send '
                           '{"verifier": "math", "items": [{"response": ..., "reference": ...}]}')
    items = payload["items"]
    if not isinstance(items, list):
        raise Refusal(422, f'"items" must be an array, got {_json_type(items)}')
    if len(items) > settings.max_items:
        raise Refusal(413, f"{len(items)} items in one request; the limit is {settings.max_items} (--max-items); "
                           f"split the batch (the client's batch_size)")
    default_verifier = payload.get("verifier")
    default_options = payload.get("options", {})
    if default_verifier is not None and not isinstance(default_verifier, str):
        raise Refusal(422, f'"verifier" must be a string, got {_json_type(default_verifier)}')
    if not isinstance(default_options, dict):
        raise Refusal(422, f'"options" must be an object, got {_json_type(default_options)}')
    default_key = json.dumps(default_options, sort_keys=True)
    checked: set[tuple[str, str]] = set()
    default = None
    if default_verifier is not None:
        service.check_verifier(default_verifier, default_options, "request")
        checked.add((default_verifier, default_key))
        default = (default_verifier, default_options, default_key)

    parsed = []
    for i, item in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(item, dict):
            raise Refusal(422, f"{where} must be an object with response and reference, got {_json_type(item)}")
        _check_fields(item, _ITEM_FIELDS, where)
        texts = []
        for name in ("response", "reference"):
            if name not in item:
                raise Refusal(422, f'{where} has no "{name}"')
            text = item[name]
            if not isinstance(text, str):
                raise Refusal(422, f'{where}.{name} must be a string, got {_json_type(text)}')
            if len(text) > settings.max_chars:
                raise Refusal(413, f"{where}.{name} has {len(text)} characters; the limit is {settings.max_chars} "
                                   f"(--max-chars); truncate it or raise the service's limit")
            texts.append(text)
        verifier = item.get("verifier", default_verifier)
        if verifier is None:
            raise Refusal(422, f'{where} names no verifier; give "verifier" in the item or at the top level')
        if not isinstance(verifier, str):
            raise Refusal(422, f'{where}.verifier must be a string, got {_json_type(verifier)}')
        if "options" in item:
            options = item["options"]
            if not isinstance(options, dict):
                raise Refusal(422, f"{where}.options must be an object, got {_json_type(options)}")
            key = json.dumps(options, sort_keys=True)
        else:
            options, key = default_options, default_key
        if (verifier, key) not in checked:
            service.check_verifier(verifier, options, where)
            checked.add((verifier, key))
            if len(checked) > settings.max_pools:
                raise Refusal(422, f"{where}: the request names more than {settings.max_pools} (verifier, options) "
                                   f"configurations (--max-pools); split it by configuration")
        parsed.append((texts[0], texts[1], verifier, options, key))
    return parsed, default


def _check_fields(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise Refusal(422, f"{where} has unknown field(s) {unknown}; allowed: {', '.join(allowed)}")


def render_results(scores: list[Score]) -> bytes:
    results = [dict(reward=s.reward, correct=s.correct, extracted=s.extracted, error=s.error) for s in scores]
    # ASCII-only output: an extracted answer may hold a lone surrogate from a JSON "\ud800" escape.
    return json.dumps({"results": results}, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- HTTP


def _json_response(status: int, content: dict, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(content, ensure_ascii=True).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _check_host(request: Request, allowed: tuple[str, ...]) -> None:
    """Refuse (403) a Host header outside ``allowed`` (when it is not empty): DNS rebinding."""
    given = request.headers.get("host", "")
    name = given[: given.find("]") + 1] if given.startswith("[") else given.partition(":")[0]
    if allowed and name.lower() not in allowed:
        raise Refusal(403, f"Host {given[:100]!r} is not one this service answers to ({', '.join(allowed)}): a web "
                           f"page may be reaching it through DNS rebinding; address it as http://127.0.0.1:PORT")


def _check_content_type(request: Request) -> None:
    """Refuse (415) a POST whose body is not declared JSON: a web page may send text/plain or form bodies
    to any port without the browser asking first, but not application/json."""
    given = request.headers.get("content-type", "")
    if given.split(";", 1)[0].strip().lower() != "application/json":
        raise Refusal(415, f"Content-Type must be application/json, got {given[:100]!r}; send the JSON body with "
                           f"'Content-Type: application/json'")


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown client"


def _authorized(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode("latin-1"), token.encode())


_UNAUTHORIZED = ("missing or wrong bearer token: send 'Authorization: Bearer <token>' with the token the "
                 "service was started with (--token-env)")


def create_app(settings: ServiceSettings) -> Starlette:
    """The ASGI app; ``app.state.service`` is its ``RewardService``. Run it with ``rlkit.reward.serve``.

    Starlette (FastAPI's core) rather than FastAPI: requests are validated by hand, so that
    every refusal names the field and the fix, which leaves FastAPI nothing to do but add
    0.4 s of imports.
    """
    service = RewardService(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        service.preload()
        try:
            yield
        finally:
            service.draining = True
            service.abandon_all()
            await asyncio.get_running_loop().run_in_executor(None, service.close)

    async def score(request: Request) -> Response:
        start = time.perf_counter()
        status, content, headers = 200, None, None
        try:
            _check_host(request, settings.allowed_hosts)
            if not _authorized(request, settings.token):
                raise Refusal(401, _UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
            if service.draining:
                raise _ShuttingDown()
            _check_content_type(request)
            items, default = parse_items(parse_json(await read_body(request, settings.max_request_bytes)), service)
            if not items and default is not None:
                service.scorer(*default)  # a client's check(): start the workers now
            scores = await service.score(items, request.receive)
            if scores is None:  # the client left; nobody reads this answer
                status = 499
                log.info("client %s left before its %d item(s) were scored; its queued items are skipped",
                         _peer(request), len(items))
                return Response(status_code=status)
            for verifier in {item[2] for item in items}:
                service.metrics.observe_scores(verifier, [s for s, item in zip(scores, items) if item[2] == verifier])
            return Response(render_results(scores), media_type="application/json")
        except Refusal as refusal:
            status, content, headers = refusal.status, {"detail": refusal.detail}, refusal.headers
        except _ShuttingDown:
            status, content = 503, {"detail": "service is shutting down; retry against a running instance"}
            headers = {"Retry-After": "1"}
        except _ScorerFailed as err:
            status, content = 500, {"detail": f"{err}; see the service's log for the worker's traceback"}
        except ClientDisconnect:
            status, reason = request.scope.get(CLOSED_BY_SERVER, (499, "the client closed the connection"))
            log.info("request from %s ended before its body arrived: %s", _peer(request), reason)
            return Response(status_code=status)  # nobody reads it
        except BaseException:
            status = 500  # a bug or a cancellation: counted, then left to Starlette/uvicorn
            raise
        finally:
            service.metrics.observe_request(status, time.perf_counter() - start)
        return _json_response(status, content, headers)

    async def health(request: Request) -> Response:
        return _json_response(200, {"status": "ok"})

    async def ready(request: Request) -> Response:
        if service.draining:
            return _json_response(503, {"status": "shutting_down"})
        return _json_response(200, {"status": "ready", "verifiers": list(service.verifiers), "pools": service.pools(),
                                    "queued_items": service.queued, "workers_per_pool": settings.workers})

    async def metrics(request: Request) -> Response:
        try:
            _check_host(request, settings.allowed_hosts)
        except Refusal as refusal:
            return _json_response(refusal.status, {"detail": refusal.detail})
        if not _authorized(request, settings.token):
            return _json_response(401, {"detail": _UNAUTHORIZED}, {"WWW-Authenticate": "Bearer"})
        return Response(service.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app = Starlette(
        routes=[Route("/score", score, methods=["POST"]), Route("/health", health, methods=["GET"]),
                Route("/ready", ready, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])],
        lifespan=lifespan,
    )
    app.state.service = service
    return app
