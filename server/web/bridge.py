"""Calls the gRPC servicer in-process for the HTTP API, with the same checks.

The HTTP handlers never score, validate or curate anything themselves: they
build the request message and hand it to the very servicer instance the gRPC
server uses, through ``HttpContext``, which gives it what a
``grpc.ServicerContext`` gives (``abort``, ``time_remaining``, ``peer``,
``invocation_metadata``). What the gRPC interceptors do before a call is done
here with the same functions: the API key check (``auth.refusal_for``), the
message-size cap and the per-field limits (``limits.check_request``).
Servicers raise errors that ``server.grpc.errors`` maps to a status (the gRPC
``ErrorInterceptor`` applies the same table) or abort through the context.
A gRPC status code becomes the HTTP status of Google's HTTP mapping
(``google/rpc/code.proto``) and a JSON body ``{"code": NAME, "message": ...}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.server.grpc.auth import SERVICE, ApiKeys, refusal_for
from biolit_id.server.grpc.errors import MAPPED_ERRORS, status_of
from biolit_id.server.grpc.limits import PER_ITEM_METHODS, check_request
from biolit_id.server.grpc.observability import Metrics, log_access

log = logging.getLogger(__name__)

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


class ApiError(Exception):
    """A call's failure: a gRPC status code, its message, and the HTTP status to send."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status or HTTP_STATUS.get(code, 500)

    def body(self) -> dict[str, Any]:
        return {"code": self.code.name, "message": self.message}


class HttpContext:
    """What the servicers use of ``grpc.ServicerContext``, for one HTTP request."""

    def __init__(self, peer: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._peer = peer
        self._metadata = metadata
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def abort(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details
        raise ApiError(code, details)

    def time_remaining(self) -> float | None:
        return None  # HTTP requests carry no deadline

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def is_active(self) -> bool:
        return True

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details


class Bridge:
    """Runs one RPC of ``servicer`` for an HTTP request (blocking: call it in a thread)."""

    def __init__(self, servicer: object, keys: ApiKeys | None, max_message_bytes: int,
                 metrics: Metrics | None = None) -> None:
        self.servicer = servicer
        self.keys = keys
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics

    def authorize(self, method: str, token: str | None) -> None:
        """The gRPC key check for ``method``; with no keys configured every call may run."""
        if self.keys is None:
            return
        refusal = refusal_for(self.keys, f"/{SERVICE}/{method}", token)
        if refusal is not None:
            raise ApiError(*refusal)

    def call(self, method: str, request: Message | list[Message], token: str | None,
             peer: str) -> Message:
        """``servicer.<method>(request, context)``; a list is sent as a request stream."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        message = ""
        try:
            self.authorize(method, token)
            self._admit(method, request)
            behavior: Callable[..., Message] = getattr(self.servicer, method)
            argument = iter(request) if isinstance(request, list) else request
            try:
                return behavior(argument, HttpContext(peer))
            except MAPPED_ERRORS as exc:  # servicers raise; server.grpc.errors has the table
                found = status_of(exc)
                if found is None:
                    raise
                raise ApiError(*found) from None
        except ApiError as exc:
            code, message = exc.code, exc.message
            raise
        except Exception:
            log.exception("HTTP %s failed", method)
            code, message = grpc.StatusCode.INTERNAL, "internal error"
            raise ApiError(code, message) from None
        finally:
            self._observe(method, code, message, time.perf_counter() - started, peer)

    def _observe(self, method: str, code: grpc.StatusCode, message: str, seconds: float,
                 peer: str) -> None:
        """The access line the gRPC interceptor would write, and the HTTP metrics."""
        if self.metrics is not None:
            self.metrics.http_requests.labels(method, code.name).inc()
            self.metrics.http_latency.labels(method).observe(seconds)
        log_access(logging.INFO, "http", SERVICE, method, code.name, seconds, peer, message)

    def _admit(self, method: str, request: Message | list[Message]) -> None:
        """The interceptors' checks: message size, then per-field limits."""
        items = request if isinstance(request, list) else [request]
        for index, item in enumerate(items):
            size = item.ByteSize()
            if size > self.max_message_bytes:
                raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"request is {size} bytes, at most {self.max_message_bytes} "
                               "allowed", http_status=413)
            if method in PER_ITEM_METHODS:
                continue  # the servicer checks these itself
            try:
                check_request(item)
            except InvalidRequestError as exc:
                prefix = f"message {index}: " if isinstance(request, list) else ""
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"{prefix}{exc}") from None
