"""Start the gRPC server: servicer, health, reflection, graceful shutdown."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from biolit_id.server.config import ServerConfig
from biolit_id.server.grpc.auth import (
    AuthInterceptor,
    check_exposure,
    load_api_keys,
    server_credentials,
)
from biolit_id.server.grpc.errors import ErrorInterceptor
from biolit_id.server.grpc.limits import GuardInterceptor
from biolit_id.server.grpc.observability import (
    Metrics,
    ObservabilityInterceptor,
    configure_access_log,
)
from biolit_id.server.grpc.servicer import SpeciesIdentifierServicer
from biolit_id.server.grpc.streams import StreamGuardInterceptor
from biolit_id.server.web.runner import HttpServer, HttpStartError, start_http
from biolit_id.server.wiring import ServiceState, build_state

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpeciesIdentifier"].full_name


class RunningServer:
    """A started server plus what stopping it cleanly needs."""

    def __init__(self, server: grpc.Server, port: int, state: ServiceState,
                 health_servicer: health.HealthServicer, metrics: Metrics | None = None,
                 tls: bool = False, http: HttpServer | None = None) -> None:
        self.server = server
        self.port = port
        self.state = state
        self.health = health_servicer
        self.metrics = metrics
        self.tls = tls
        self.http = http  # the web page and JSON API, when config.http_port is set

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, stop taking calls, let in-flight calls finish."""
        self.health.enter_graceful_shutdown()
        grace = self.state.config.grace_seconds if grace is None else grace
        if self.http is not None:
            self.http.stop(grace)
        self.server.stop(grace).wait()
        if self.metrics is not None:
            self.metrics.close()
        for part in (self.state.batcher, self.state.gallery):
            closer = getattr(part, "close", None)
            if closer is not None:
                closer()

    def wait(self) -> None:
        self.server.wait_for_termination()


def start_server(config: ServerConfig, state: ServiceState | None = None) -> RunningServer:
    # Security settings first: a refused configuration should not cost a model load.
    check_exposure(config.host, config.api_keys is not None, config.insecure)
    keys = load_api_keys(config.api_keys) if config.api_keys is not None else None
    credentials = server_credentials(config.tls_cert, config.tls_key)
    state = state or build_state(config)
    metrics = Metrics()
    metrics.bind_state(state)
    # Order matters: every call is logged (rejected ones too), keys are checked
    # before any request field is looked at.
    interceptors: list[grpc.ServerInterceptor] = [ObservabilityInterceptor(metrics)]
    if keys is not None:
        interceptors.append(AuthInterceptor(keys))
    interceptors.append(
        GuardInterceptor(on_deadline_drop=lambda m: metrics.deadline_dropped.labels(m).inc())
    )
    interceptors.append(StreamGuardInterceptor(config.stream_limit, config.stream_idle_timeout_s))
    interceptors.append(ErrorInterceptor())  # innermost: servicers raise, it sets the status
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", max(config.max_message_bytes, 64 * 1024 * 1024)),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc"),
        options=options,
        maximum_concurrent_rpcs=config.max_workers * 16,
        interceptors=interceptors,
    )
    servicer = SpeciesIdentifierServicer(state)
    pb_grpc.add_SpeciesIdentifierServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if credentials is not None:
        port = server.add_secure_port(config.address, credentials)
    else:
        port = server.add_insecure_port(config.address)
    if port == 0:
        raise RuntimeError(f"cannot bind {config.address}")
    if config.metrics_port is not None:
        metrics.serve(config.host, config.metrics_port)
    server.start()
    # The same servicer instance: HTTP calls run the gRPC methods in-process.
    try:
        http = (start_http(config, servicer, keys, metrics) if config.http_port is not None
                else None)
    except HttpStartError:
        server.stop(0)
        raise
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("biolit-id serving %s on %s:%d (%s mode, %s, %s)", config.model, config.host, port,
             state.scorer.mode, "TLS" if credentials is not None else "plaintext",
             f"{len(keys)} API keys" if keys is not None else "no API keys")
    return RunningServer(server, port, state, health_servicer, metrics,
                         tls=credentials is not None, http=http)


def serve_forever(config: ServerConfig) -> None:
    configure_access_log()
    running = start_server(config)
    done = threading.Event()

    def _graceful(signum, _frame):
        log.info("signal %s: draining in-flight calls (grace %.0f s)", signum, config.grace_seconds)
        threading.Thread(target=lambda: (running.stop(), done.set()), daemon=True).start()

    signal.signal(signal.SIGTERM, _graceful)
    signal.signal(signal.SIGINT, _graceful)
    print(f"biolit-id listening on {config.host}:{running.port}", flush=True)
    if running.http is not None:
        print(f"biolit-id web page and JSON API: {running.http.url}", flush=True)
    done.wait()
