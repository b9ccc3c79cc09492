"""Run the verifier-reward service: ``python -m rlkit.reward.serve --port 8000 --workers 2``.

Binds 127.0.0.1 unless told otherwise; bound to loopback, /score and /metrics answer only
to the Host names 127.0.0.1, localhost and [::1] (a web page using DNS rebinding sends its
own). ``--token-env NAME`` requires ``Authorization: Bearer $NAME`` on /score and /metrics
(the token is read from the environment, never from the command line, so it does not show
in ``ps``). On SIGTERM / Ctrl-C the service stops
accepting connections, closes those still sending a request, gives requests being scored
``--grace-s`` to finish, answers what is left with 503, then kills every worker process.

Slow or stalled clients cannot hold the service: a connection must deliver a complete
request (headers and body) within ``--read-timeout-s`` of opening (or of its previous
answer), else it is closed; past ``--max-connections`` the connection that has waited
longest on its client is closed to make room, so /health keeps answering. See
docs/reward_service.md.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import socket
import sys

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from rlkit.reward.app import CLOSED_BY_SERVER, create_app
from rlkit.reward.service import LOOPBACK_HOSTS, RewardService, ServiceSettings

log = logging.getLogger("rlkit.reward.serve")


class _GuardedConnection:
    """Mixin over uvicorn's HTTP/1.1 protocol (httptools or h11): a read deadline per request, a cap on
    open connections, and a shutdown that closes connections still waiting on their client.

    Uses what both uvicorn protocols share: ``connections`` (the server's set), ``cycle`` (the current
    request: ``more_body`` until its body is in, ``response_complete``, ``scope``), ``transport``,
    ``client``, ``loop``, and the ``connection_made`` / ``on_response_complete`` / ``connection_lost`` /
    ``shutdown`` hooks.
    """

    read_timeout_s: float
    max_connections: int
    _since = 0.0  # when this connection began waiting for its current request
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own read_timeout_s

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._reading_body():
            self._close(503, "the service is shutting down")  # a body that may never come
        else:
            super().shutdown()  # idle: closed now; being answered: closed after the answer

    def _reading_body(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete and cycle.more_body

    def _waiting_on_client(self) -> bool:
        return self.cycle is None or self.cycle.response_complete or self._reading_body()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._since = self.loop.time()
        self._timer = self.loop.call_later(self.read_timeout_s, self._expire)

    def _expire(self) -> None:
        if self._waiting_on_client() and not self.transport.is_closing():
            self._close(408, f"no complete request within {self.read_timeout_s:g} s (--read-timeout-s)")

    def _make_room(self) -> None:
        still_open = [c for c in self.connections if not c.transport.is_closing()]  # closed ones leave next tick
        if len(still_open) <= self.max_connections:
            return
        waiting = [c for c in still_open if c is not self and c._waiting_on_client()]
        if not waiting:
            self._close(503, f"all {self.max_connections} connections are busy (--max-connections)")
            return
        oldest = min(waiting, key=lambda c: c._since)
        oldest._close(503, f"closed to make room: it waited longest of {self.max_connections} connections "
                           f"(--max-connections)")

    def _close(self, status: int, reason: str) -> None:
        """Close the connection with one log line: the app's (which sees a disconnect) while it reads a body."""
        if self._reading_body():
            self.cycle.scope[CLOSED_BY_SERVER] = (status, reason)
        else:
            peer = "%s:%d" % self.client if self.client else "unknown client"
            log.info("closed connection from %s: %s", peer, reason)
        self.transport.close()


def guarded_protocol(read_timeout_s: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's default HTTP protocol class with ``_GuardedConnection``'s limits."""
    return type("GuardedHTTPProtocol", (_GuardedConnection, AutoHTTPProtocol),
                {"read_timeout_s": read_timeout_s, "max_connections": max_connections})


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown first drains the reward service (see ``RewardService.drain``)."""

    def __init__(self, config: uvicorn.Config, service: RewardService, grace_s: float):
        super().__init__(config)
        self.service = service
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.ensure_future(self.service.drain(self.grace_s))
        try:
            await super().shutdown(sockets)  # closes the listeners, waits for connections, then the app's lifespan end
        finally:
            drain.cancel()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); valid once ``started``."""
        return self.servers[0].sockets[0].getsockname()[1]


def build_server(settings: ServiceSettings, *, host: str = "127.0.0.1", port: int = 8000, grace_s: float = 30.0,
                 read_timeout_s: float = 10.0, max_connections: int = 256, log_level: str = "info",
                 access_log: bool = False) -> DrainingServer:
    """A ready-to-``run()`` server for the service; ``port=0`` picks a free port (read ``server.port`` once started)."""
    if grace_s < 0:
        raise ValueError(f"grace_s must be >= 0 seconds, got {grace_s!r}")
    if not read_timeout_s > 0:
        raise ValueError(f"read_timeout_s must be > 0 seconds, got {read_timeout_s!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on",
        http=guarded_protocol(read_timeout_s, max_connections),
        # uvicorn's own limit, a backstop behind our drain (which answers every request within grace_s).
        timeout_graceful_shutdown=grace_s + 5.0,
    )
    return DrainingServer(config, app.state.service, grace_s)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = ServiceSettings()
    p = argparse.ArgumentParser(prog="python -m rlkit.reward.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the service")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="verifier worker processes per verifier configuration")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s,
                   help="per-item wall-clock limit (unscorable past it)")
    p.add_argument("--startup-timeout-s", type=float, default=d.startup_timeout_s, help="limit for a worker's start-up")
    p.add_argument("--token-env", default=None, metavar="NAME",
                   help="require 'Authorization: Bearer <token>' with the token read from environment variable NAME")
    p.add_argument("--verifier", action="append", default=[], metavar="PKG.MOD:FN", dest="extra_verifiers",
                   help="also allow this import-path verifier (repeatable); registered verifiers are always allowed")
    p.add_argument("--preload", action="append", default=[], metavar="NAME",
                   help="start this verifier's workers (default options) at start-up (repeatable)")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help="largest request body")
    p.add_argument("--max-items", type=int, default=d.max_items, help="most items in one request")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="longest response or reference, in characters")
    p.add_argument("--max-queued-items", type=int, default=d.max_queued_items,
                   help="items waiting across all requests before new requests get 503")
    p.add_argument("--max-pools", type=int, default=d.max_pools,
                   help="most distinct (verifier, options) configurations")
    p.add_argument("--read-timeout-s", type=float, default=10.0,
                   help="a connection must deliver a complete request within this time, else it is closed")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections; past it the one waiting longest on its client is closed")
    p.add_argument("--grace-s", type=float, default=30.0, help="on shutdown, time given to in-flight requests")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServiceSettings:
    environ = os.environ if environ is None else environ
    token = None
    if args.token_env is not None:
        token = environ.get(args.token_env, "")
        if not token:
            raise SystemExit(f"--token-env {args.token_env}: environment variable {args.token_env} is unset or empty; "
                             f"export the token there (e.g. export {args.token_env}=$(openssl rand -hex 32))")
    try:
        return ServiceSettings(
            workers=args.workers, timeout_s=args.timeout_s, startup_timeout_s=args.startup_timeout_s, token=token,
            allowed_hosts=LOOPBACK_HOSTS if _is_loopback(args.host) else (),
            extra_verifiers=tuple(args.extra_verifiers), preload=tuple(args.preload),
            max_request_bytes=args.max_request_bytes, max_items=args.max_items, max_chars=args.max_chars,
            max_queued_items=args.max_queued_items, max_pools=args.max_pools,
        )
    except (ValueError, KeyError) as err:
        raise SystemExit(f"rlkit.reward.serve: {err.args[0]}") from err


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _is_loopback(args.host) and settings.token is None:
        log.warning("binding %s without --token-env: anyone who can reach this port can use its verifier workers",
                    args.host)
    server = build_server(settings, host=args.host, port=args.port, grace_s=args.grace_s,
                          read_timeout_s=args.read_timeout_s, max_connections=args.max_connections,
                          log_level=args.log_level, access_log=args.access_log)
    try:
        server.run()
    finally:
        server.service.close()  # normally done already by the app's shutdown; covers a forced exit
    if not server.started:
        sys.exit(1)  # e.g. the port was taken; uvicorn logged why


if __name__ == "__main__":
    main()
