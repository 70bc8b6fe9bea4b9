"""Runs the HTTP app with uvicorn in a thread of the serving process."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from biolit_id.server.config import ServerConfig
from biolit_id.server.grpc.auth import ApiKeys, is_loopback
from biolit_id.server.grpc.observability import Metrics
from biolit_id.server.web.api import create_app
from biolit_id.server.web.bridge import Bridge
from biolit_id.server.web.guard import WebGuard, body_cap

log = logging.getLogger(__name__)
START_TIMEOUT_S = 30.0


class HttpStartError(RuntimeError):
    """The HTTP port could not be bound or the server did not come up."""


class HttpServer:
    """A started uvicorn server: its port, its URL, and a clean stop."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, host: str, port: int,
                 tls: bool) -> None:
        self.server = server
        self.thread = thread
        self.host = host
        self.port = port
        self.tls = tls

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let requests in flight finish for up to ``grace`` seconds."""
        self.server.should_exit = True
        self.thread.join(grace + 5.0)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise HttpStartError(f"cannot bind HTTP {host}:{port}: {exc.strerror or exc}") from None


def start_http(config: ServerConfig, servicer: object, keys: ApiKeys | None,
               metrics: Metrics | None = None) -> HttpServer:
    """Serve the page and the API on ``config.host:config.http_port`` (0 = a free port).

    Same host, keys and TLS files as gRPC; ``check_exposure`` has already run.
    """
    bridge = Bridge(servicer, keys, config.max_message_bytes, metrics)
    app = WebGuard(create_app(bridge), body_cap(config.max_message_bytes),
                   loopback_only=keys is None and is_loopback(config.host))
    sock = _bind(config.host, int(config.http_port or 0))
    uv_config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off",
        ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
        ssl_keyfile=str(config.tls_key) if config.tls_key else None,
        # Like gRPC's maximum_concurrent_rpcs: beyond it, 503 at once.
        limit_concurrency=config.max_workers * 16,
        timeout_graceful_shutdown=max(1, int(config.grace_seconds)),
    )
    server = uvicorn.Server(uv_config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="http", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise HttpStartError("the HTTP server did not start (see the log)")
        time.sleep(0.01)
    running = HttpServer(server, thread, config.host, sock.getsockname()[1],
                         tls=config.tls_cert is not None)
    log.info("web page and JSON API on %s", running.url)
    return running


__all__ = ["HttpServer", "HttpStartError", "start_http"]
