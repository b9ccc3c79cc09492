"""The reward service over HTTP (Starlette): request checks, routing, status codes.

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
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from rlkit.reward.requests import Refusal, parse_items, parse_json, read_body, render_results
from rlkit.reward.service import RewardService, ServiceSettings, ShuttingDown
from rlkit.reward.service_scorer import ScorerFailed

log = logging.getLogger("rlkit.reward.service")

# Set in a request's ASGI scope by the server (rlkit.reward.serve) when it closes the connection before the
# body arrived: (status counted in the metrics, reason logged).
CLOSED_BY_SERVER = "rlkit.closed_by_server"


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
                raise ShuttingDown()
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
        except ShuttingDown:
            status, content = 503, {"detail": "service is shutting down; retry against a running instance"}
            headers = {"Retry-After": "1"}
        except ScorerFailed as err:
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
