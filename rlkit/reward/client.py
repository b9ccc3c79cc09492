"""Client for the verifier-reward service, a drop-in for ``VerifierPool`` in the trainer.

``RewardClient(url, verifier=...).score(responses, references) -> list[Score]``, the same
call and results as ``VerifierPool.score``. Connection errors, timeouts and 5xx answers
are retried with exponential backoff (except a refused connection in ``check``, which means
no service is there); once the retries are spent it raises
``RewardServiceError`` (a RuntimeError naming the URL and what to check) rather than
return made-up scores. A 4xx answer (bad token, unknown verifier, limits) raises at once.
"""
from __future__ import annotations

import json
import math
import random
import threading
import time

import httpx

from rlkit.reward.verifiers import Score, check_score_inputs


class RewardServiceError(RuntimeError):
    """The reward service could not score a batch: unreachable, failing, or refusing the request.
    ``status``: the HTTP status of a refused request; None when no answer came (``refused``: no connection)."""

    def __init__(self, message: str, *, status: int | None = None, refused: bool = False):
        super().__init__(message)
        self.status, self.refused = status, refused


class RewardClient:
    """Scores through ``python -m rlkit.reward.serve`` at ``url``.

    verifier, options: what every item is scored with (as in ``VerifierPool``).
    token: bearer token, when the service was started with ``--token-env``.
    timeout_s: per-request deadline: how long to wait for one batch's answer (and for connecting).
    retries: further attempts per batch after a connection error, timeout or 5xx answer;
        the waits between them grow as ``backoff_s * 2**k`` (jittered, at most ``max_backoff_s``).
    batch_size: items per request; larger inputs are sent as consecutive requests.
    ``stats``: cumulative requests (HTTP attempts), retries, items, batches, seconds.
    Thread-safe: one client may serve several threads.
    """

    def __init__(
        self,
        url: str,
        *,
        verifier: str,
        options: dict | None = None,
        token: str | None = None,
        timeout_s: float = 300.0,
        retries: int = 6,
        backoff_s: float = 0.5,
        max_backoff_s: float = 16.0,
        batch_size: int = 512,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward service url must start with http:// or https://, got {url!r}")
        if not isinstance(verifier, str) or not verifier:
            raise ValueError(f"verifier must be a non-empty name such as 'math', got {verifier!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not (backoff_s >= 0 and max_backoff_s >= 0):
            raise ValueError(f"backoff_s and max_backoff_s must be >= 0, got {backoff_s!r}, {max_backoff_s!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.url = url.rstrip("/")
        self.verifier = verifier
        self.options = dict(options or {})
        try:
            json.dumps(self.options, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(f"verifier options must be JSON-serialisable to reach the service: {err}") from err
        self.timeout_s = float(timeout_s)
        self.retries = retries
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.batch_size = batch_size
        self.stats: dict[str, float] = dict(requests=0, retries=0, items=0, batches=0, seconds=0.0)
        self._stats_lock = threading.Lock()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # verify=False only for http://, which has no TLS to verify: it skips building an SSL context
        # (about 40 ms of CPU per client); https:// URLs get httpx's default certificate checks.
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(self.timeout_s),
                                  verify=self.url.startswith("https://"))

    # ------------------------------------------------------------------ public

    def score(self, responses: list[str], references: list[str]) -> list[Score]:
        """Score ``responses[i]`` against ``references[i]``; results in input order."""
        check_score_inputs(responses, references)
        start = time.perf_counter()
        results: list[Score] = []
        for first in range(0, len(responses), self.batch_size):
            last = first + self.batch_size
            results.extend(self._score_batch(responses[first:last], references[first:last]))
        self._count(items=len(results), seconds=time.perf_counter() - start)
        return results

    def check(self) -> None:
        """Raise RewardServiceError unless the service is reachable, accepts the token and offers this verifier
        with these options; starts its workers there, so call it once at start-up. A refused connection fails
        at once (nothing listens there yet); timeouts and 5xx answers are retried as in ``score``."""
        self._score_batch([], [], retry_refused=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _score_batch(self, responses: list[str], references: list[str], retry_refused: bool = True) -> list[Score]:
        payload = {"verifier": self.verifier, "options": self.options,
                   "items": [{"response": r, "reference": g} for r, g in zip(responses, references)]}
        try:
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in some text: escape it instead of failing
            body = json.dumps(payload, ensure_ascii=True).encode("ascii")
        started = time.monotonic()
        attempts, wait_s, problem = 0, self.backoff_s, ""
        while True:
            attempts += 1
            self._count(requests=1)
            retry_after = 0.0
            try:
                answer = self._http.post(f"{self.url}/score", content=body)
            except httpx.TransportError as err:  # refused, reset, timed out, ...
                problem = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                if isinstance(err, httpx.ConnectError) and not retry_refused:
                    raise RewardServiceError(f"reward service at {self.url} cannot be reached ({problem}); start "
                                             f"`python -m rlkit.reward.serve` there first", refused=True) from err
            else:
                if answer.status_code == 200:
                    self._count(batches=1)
                    return self._parse(answer, len(responses))
                detail = _detail(answer)
                if answer.status_code < 500:
                    raise RewardServiceError(self._refused(answer.status_code, detail), status=answer.status_code)
                problem = f"HTTP {answer.status_code}: {detail}"
                retry_after = _retry_after_s(answer)
            if attempts > self.retries:
                raise RewardServiceError(
                    f"reward service at {self.url} failed {attempts} attempt(s) over "
                    f"{time.monotonic() - started:.1f} s; last: {problem}. Check that `python -m rlkit.reward.serve` "
                    f"is running and reachable at that address (GET {self.url}/ready), or unset reward.url to "
                    f"score in-process"
                )
            self._count(retries=1)
            time.sleep(min(max(retry_after, wait_s * random.uniform(0.5, 1.0)), self.max_backoff_s))
            wait_s *= 2

    def _refused(self, status: int, detail: str) -> str:
        hint = {
            401: "pass the token the service was started with (its --token-env variable) as token=",
            413: "lower the client's batch_size, or raise the service's "
                 "--max-items / --max-request-bytes / --max-chars",
        }.get(status, "fix the request as the service says")
        return f"reward service at {self.url} refused the request (HTTP {status}): {detail}; {hint}"

    def _parse(self, answer: httpx.Response, expected: int) -> list[Score]:
        try:
            results = answer.json()["results"]
            if not isinstance(results, list):
                raise ValueError(f"results is {type(results).__name__}, not a list")
            if len(results) != expected:
                raise ValueError(f"expected {expected} results, got {len(results)}")
            return [_to_score(result) for result in results]
        except (ValueError, KeyError, TypeError) as err:
            raise RewardServiceError(
                f"reward service at {self.url} sent an answer this client cannot read ({err}); "
                f"check that the URL points at rlkit.reward.serve and both sides run the same rlkit version"
            ) from err

    def _count(self, **deltas: float) -> None:
        with self._stats_lock:
            for key, value in deltas.items():
                self.stats[key] += value


def _to_score(result: dict) -> Score:
    reward, correct, extracted, error = (result[k] for k in ("reward", "correct", "extracted", "error"))
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))
                               or not math.isfinite(reward)):
        raise ValueError(f"reward {reward!r} is neither a finite number nor null")
    if not isinstance(correct, bool):
        raise ValueError(f"correct {correct!r} is not a boolean")
    for name, value in (("extracted", extracted), ("error", error)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} {value!r} is neither a string nor null")
    return Score(None if reward is None else float(reward), correct, extracted, error)


def _detail(answer: httpx.Response) -> str:
    try:
        return str(answer.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return answer.text[:300] or answer.reason_phrase


def _retry_after_s(answer: httpx.Response) -> float:
    try:
        return max(0.0, float(answer.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0

