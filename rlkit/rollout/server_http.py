"""HTTP to one `vllm serve`: retries with backoff within a deadline, errors that name the URL and what was tried."""
from __future__ import annotations

import random
import time
from typing import Callable

import httpx


class ServerError(RuntimeError):
    """A vLLM server could not do what was asked: unreachable past the deadline, refusing, or answering nonsense."""


class ServerClient:
    """Requests to the server at `url`.

    timeout_s: deadline for one call, retries included: connection errors, timeouts, 429 and 5xx answers are
        retried with exponential backoff (`backoff_s * 2**k`, jittered, at most `max_backoff_s`) until it passes;
        other 4xx answers raise at once.
    exited: for a server this process launched, a callable that returns why it exited (None while it runs): a
        failed attempt then raises at once with that reason instead of retrying a dead server to the deadline.
    """

    def __init__(self, url: str, *, timeout_s: float = 120.0, backoff_s: float = 0.25, max_backoff_s: float = 8.0,
                 connections: int = 64, exited: Callable[[], str | None] | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"vLLM server url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s, self.backoff_s, self.max_backoff_s = float(timeout_s), float(backoff_s), float(max_backoff_s)
        self.exited = exited or (lambda: None)
        self._http = httpx.Client(timeout=httpx.Timeout(self.timeout_s), verify=self.url.startswith("https://"),
                                  limits=httpx.Limits(max_connections=connections))

    def get(self, path: str, **kwargs) -> dict:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> dict:
        return self.request("POST", path, **kwargs)

    def request(self, method: str, path: str, *, retry: bool = True, timeout_s: float | None = None,
                **kwargs) -> dict:
        """The JSON answer of `method url+path`. retry=False: one attempt (a step of the weight push, which a
        repeat would not mend). ServerError once the deadline (`timeout_s`, default the client's) is spent."""
        deadline_s = self.timeout_s if timeout_s is None else timeout_s
        started, wait_s, attempts, problem = time.monotonic(), self.backoff_s, 0, ""
        while True:
            attempts += 1
            left = deadline_s - (time.monotonic() - started)
            try:
                answer = self._http.request(method, self.url + path, timeout=max(left, 0.1), **kwargs)
            except httpx.TransportError as err:  # refused, reset, timed out, ...
                problem = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            else:
                if answer.status_code == 200:
                    try:
                        return answer.json()
                    except ValueError as err:
                        raise ServerError(f"vLLM server at {self.url} answered {method} {path} with something "
                                          f"that is not JSON ({err}): {answer.text[:200]!r}") from err
                problem = f"HTTP {answer.status_code}: {answer.text[:300]}"
                if answer.status_code < 500 and answer.status_code != 429:
                    raise ServerError(f"vLLM server at {self.url} refused {method} {path} ({problem})")
            elapsed = time.monotonic() - started
            if (reason := self.exited()) is not None:
                raise ServerError(f"vLLM server at {self.url} {reason} ({method} {path}: {problem})")
            if not retry or elapsed + wait_s > deadline_s:
                raise ServerError(f"vLLM server at {self.url}: {method} {path} failed {attempts} attempt(s) over "
                                  f"{elapsed:.1f} s (deadline rollout.engine.options.timeout_s={deadline_s:g}); "
                                  f"last: {problem}. Check that the server is running and reachable "
                                  f"(GET {self.url}/health)")
            time.sleep(min(wait_s * random.uniform(0.5, 1.0), self.max_backoff_s))
            wait_s = min(wait_s * 2, self.max_backoff_s)

    def close(self) -> None:
        self._http.close()
