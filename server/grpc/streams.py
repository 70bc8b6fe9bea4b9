"""Bounded client streams: idle or slow senders cannot take every worker thread.

In gRPC's synchronous server a client-streaming call (AddExemplars,
IdentifyStream) holds a worker thread while it waits for the client's next
message, so a few hundred idle streams would leave no thread for Identify.
``StreamGuardInterceptor`` admits at most ``max_streams`` such calls at once
(the rest get RESOURCE_EXHAUSTED at once, without waiting) and a watchdog
cancels a stream whose client has sent nothing for ``idle_timeout_s`` while
the server waits for it; the client then sees CANCELLED.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from biolit_id.server.grpc.auth import OPEN_SERVICES, split_method
from biolit_id.server.grpc.observability import wrap_handler

log = logging.getLogger(__name__)


class _Watched:
    """The request iterator of one stream, with when it started waiting for the client."""

    def __init__(self, requests: Iterator, context: grpc.ServicerContext, method: str) -> None:
        self.requests = requests
        self.context = context
        self.method = method
        self.waiting_since: float | None = None

    def __iter__(self) -> _Watched:
        return self

    def __next__(self):
        self.waiting_since = time.monotonic()
        try:
            return next(self.requests)
        finally:
            self.waiting_since = None


class StreamGuardInterceptor(grpc.ServerInterceptor):
    def __init__(self, max_streams: int, idle_timeout_s: float) -> None:
        self.max_streams = max(1, max_streams)
        self.idle_timeout_s = idle_timeout_s
        self._slots = threading.BoundedSemaphore(self.max_streams)
        self._lock = threading.Lock()
        self._active: set[_Watched] = set()
        self._watchdog: threading.Thread | None = None
        self.idle_cancelled = 0  # streams ended by the watchdog (tests, metrics)
        self.refused = 0  # streams refused because all slots were taken

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler.request_streaming:
            return handler
        service, method = split_method(handler_call_details.method)
        if service in OPEN_SERVICES:
            return handler

        def wrap_unary(behavior):
            def guarded(requests, context):
                watched = self._admit(requests, context, method)
                try:
                    return behavior(watched, context)
                finally:
                    self._leave(watched)
            return guarded

        def wrap_streaming(behavior):
            def guarded(requests, context):
                watched = self._admit(requests, context, method)
                try:
                    yield from behavior(watched, context)
                finally:
                    self._leave(watched)
            return guarded

        return wrap_handler(handler, wrap_unary, wrap_streaming)

    # ------------------------------------------------------------ internals

    def _admit(self, requests: Iterator, context: grpc.ServicerContext, method: str) -> _Watched:
        if not self._slots.acquire(blocking=False):
            with self._lock:
                self.refused += 1
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many open streams ({self.max_streams}); retry later, or "
                          "send fewer streams at once")
        watched = _Watched(requests, context, method)
        with self._lock:
            self._active.add(watched)
            if self.idle_timeout_s > 0 and (self._watchdog is None
                                            or not self._watchdog.is_alive()):
                self._watchdog = threading.Thread(target=self._watch, name="stream-watchdog",
                                                  daemon=True)
                self._watchdog.start()
        return watched

    def _leave(self, watched: _Watched) -> None:
        with self._lock:
            if watched not in self._active:
                return
            self._active.discard(watched)
        self._slots.release()

    def _watch(self) -> None:
        period = min(1.0, self.idle_timeout_s / 4)
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self._lock:
                if not self._active:
                    self._watchdog = None
                    return
                idle = [w for w in self._active
                        if w.waiting_since is not None
                        and now - w.waiting_since > self.idle_timeout_s]
            for watched in idle:
                log.info("%s: client sent nothing for %.0f s; stream cancelled",
                         watched.method, self.idle_timeout_s)
                with self._lock:
                    self.idle_cancelled += 1
                watched.waiting_since = None  # cancel once
                watched.context.cancel()
