"""Access logs and Prometheus metrics, from one server interceptor.

Every call produces exactly one JSON line on the ``biolit.access`` logger:
time, service, method, status code, latency, peer and, for failures, the
status message. Nothing from the request body is logged (no photo bytes, no
embeddings, no names) and no metadata either (so never an API key).

Metrics live in a registry per server rather than prometheus_client's global
one, so that several servers in one process (tests, benchmarks) do not
collide; ``--metrics-port`` serves that registry over HTTP.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

from biolit_id.server.grpc.auth import OPEN_SERVICES, split_method

access_log = logging.getLogger("biolit.access")
log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
MAX_LOGGED_DETAILS = 300


def log_access(level: int, event: str, service: str, method: str, code: str,
               seconds: float, peer: str, details: str | bytes | None = None,
               **extra) -> None:
    """One access line, for gRPC calls and HTTP API calls alike (never a body or a key)."""
    if not access_log.isEnabledFor(level):
        return
    record = {
        "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "event": event,
        "service": service,
        "method": method,
        "code": code,
        "latency_ms": round(seconds * 1000.0, 2),
        "peer": peer,
        **extra,
    }
    if code != "OK" and details:
        if isinstance(details, bytes):
            details = details.decode("utf-8", "replace")
        record["details"] = details[:MAX_LOGGED_DETAILS]
    access_log.log(level, json.dumps(record, ensure_ascii=False))


class Metrics:
    """The service's Prometheus metrics (one registry per server)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "biolit_requests", "gRPC calls by method and status code",
            ("method", "code"), registry=r,
        )
        self.latency = Histogram(
            "biolit_request_duration_seconds", "gRPC call latency by method",
            ("method",), buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "biolit_requests_in_flight", "gRPC calls being handled now", registry=r,
        )
        self.http_requests = Counter(
            "biolit_http_requests", "JSON API calls by RPC method and status code",
            ("method", "code"), registry=r,
        )
        self.http_latency = Histogram(
            "biolit_http_request_duration_seconds", "JSON API call latency by RPC method",
            ("method",), buckets=LATENCY_BUCKETS, registry=r,
        )
        self.deadline_dropped = Counter(
            "biolit_deadline_dropped", "calls dropped unstarted because their deadline had passed",
            ("method",), registry=r,
        )
        self.queue_depth = Gauge(
            "biolit_queue_depth", "images waiting for the model (micro-batch queue)", registry=r,
        )
        self.gallery_size = Gauge(
            "biolit_gallery_size", "reference exemplars in the gallery", registry=r,
        )
        self.model_load_seconds = Gauge(
            "biolit_model_load_seconds", "time taken to load the model at start-up", registry=r,
        )
        self.info = Info("biolit_service", "model and mode of this server", registry=r)
        self._http: object | None = None
        self.port: int | None = None

    def bind_state(self, state) -> None:
        """Read live values from the service state at scrape time."""
        self.model_load_seconds.set(float(getattr(state.model, "load_seconds", 0.0)))
        self.gallery_size.set_function(lambda: float(_gallery_size(state)))
        self.queue_depth.set_function(lambda: float(queue_depth(state)))
        self.info.info({
            "model": str(state.model.spec),
            "mode": str(state.scorer.mode),
            "runtime": str(getattr(state.embedder, "runtime", "")),
            "precision": str(getattr(state.embedder, "precision", "")),
        })

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port (port 0 picks one)."""
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = httpd
        self.port = int(httpd.server_port)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _gallery_size(state) -> int:
    try:
        return int(getattr(state.gallery, "size", 0) or 0)
    except Exception:  # a scrape must never fail because the gallery is busy
        return 0


def queue_depth(state) -> int:
    """Images queued for the model, whatever the batcher calls it (0 without one)."""
    batcher = getattr(state, "batcher", None)
    if batcher is None:
        return 0
    for name in ("queue_depth", "depth", "qsize", "pending"):
        value = getattr(batcher, name, None)
        if value is None:
            continue
        try:
            return int(value() if callable(value) else value)
        except Exception:
            return 0
    return 0


def configure_access_log(stream=None) -> None:
    """Write access lines as bare JSON (no logging prefix) to ``stream``.

    Called by ``biolit-id serve``; library users and tests keep the default
    propagation to the root logger instead.
    """
    if getattr(access_log, "_biolit_configured", False):
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    access_log._biolit_configured = True  # type: ignore[attr-defined]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap_unary: Callable[[Callable], Callable],
    wrap_streaming: Callable[[Callable], Callable],
) -> grpc.RpcMethodHandler:
    """Rebuild ``handler`` with its behaviour wrapped, keeping its kind and codecs.

    ``wrap_unary`` wraps behaviours that return one response, ``wrap_streaming``
    those that yield responses.
    """
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            wrap_streaming(handler.stream_stream), **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            wrap_streaming(handler.unary_stream), **kwargs)
    return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **kwargs)


def _code_name(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()
    if code is not None:
        if isinstance(code, grpc.StatusCode):
            return code.name
        return str(code)
    if failed:
        return "UNKNOWN"  # an unhandled exception: gRPC answers UNKNOWN
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:  # gRPC clamps it at 0
        return "DEADLINE_EXCEEDED"  # finished, but after the client gave up
    return "OK"


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Outermost interceptor: sees every call, including ones auth rejects."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        quiet = service in OPEN_SERVICES  # health probes: debug level, not metrics noise

        def finish(context, started: float, failed: bool | None, responses: int | None) -> None:
            # failed: True = error, False = done, None = cancelled by the client.
            elapsed = time.perf_counter() - started
            code = "CANCELLED" if failed is None else _code_name(context, failed)
            if self.metrics is not None:
                self.metrics.in_flight.dec()
                if not quiet:
                    self.metrics.requests.labels(method, code).inc()
                    self.metrics.latency.labels(method).observe(elapsed)
            extra = {} if responses is None else {"responses": responses}
            details = context.details() if code != "OK" and hasattr(context, "details") else None
            log_access(logging.DEBUG if quiet else logging.INFO, "rpc", service, method, code,
                       elapsed, context.peer(), details, **extra)

        def start() -> float:
            if self.metrics is not None:
                self.metrics.in_flight.inc()
            return time.perf_counter()

        def wrap_unary(behavior):
            def observed(request, context):
                started = start()
                try:
                    response = behavior(request, context)
                except BaseException:
                    finish(context, started, True, None)
                    raise
                finish(context, started, False, None)
                return response
            return observed

        def wrap_streaming(behavior):
            def observed(request, context) -> Iterator:
                started = start()
                sent = 0
                try:
                    for response in behavior(request, context):
                        yield response
                        sent += 1
                except GeneratorExit:  # the client went away mid-stream
                    finish(context, started, None, sent)
                    raise
                except BaseException:
                    finish(context, started, True, sent)
                    raise
                finish(context, started, False, sent)
            return observed

        return wrap_handler(handler, wrap_unary, wrap_streaming)

