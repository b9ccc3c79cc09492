"""Run the verifier-reward service: ``python -m rlkit.reward.serve --port 8000 --workers 2``.

Binds 127.0.0.1 unless told otherwise. ``--token-env NAME`` requires ``Authorization:
Bearer $NAME`` on /score and /metrics (the token is read from the environment, never from
the command line, so it does not show in ``ps``). On SIGTERM / Ctrl-C the service stops
accepting connections, gives in-flight requests ``--grace-s`` to finish, answers what is
left with 503, then stops every worker process. See docs/reward_service.md.
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

from rlkit.reward.service import RewardService, ServiceSettings, create_app

log = logging.getLogger("rlkit.reward.serve")


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
                 limit_concurrency: int = 256, log_level: str = "info", access_log: bool = False) -> DrainingServer:
    """A ready-to-``run()`` server for the service; ``port=0`` picks a free port (read ``server.port`` once started)."""
    if grace_s < 0:
        raise ValueError(f"grace_s must be >= 0 seconds, got {grace_s!r}")
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on",
        limit_concurrency=limit_concurrency,
        # uvicorn's own limit, a backstop behind our drain: in-flight items finish within timeout_s of its end.
        timeout_graceful_shutdown=grace_s + settings.timeout_s + 5.0,
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
    p.add_argument("--limit-concurrency", type=int, default=256, help="open connections before new ones get 503")
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
                          limit_concurrency=args.limit_concurrency, log_level=args.log_level,
                          access_log=args.access_log)
    try:
        server.run()
    finally:
        server.service.close()  # normally done already by the app's shutdown; covers a forced exit
    if not server.started:
        sys.exit(1)  # e.g. the port was taken; uvicorn logged why


if __name__ == "__main__":
    main()
