"""A MilvusClient that outlives its server: Milvus stopped and restarted under a running service.

pymilvus does not get back by itself: its channel keeps failing for a while
after the server is back, and a restarted server has the collections
released, so every search and query fails with "call load() before search".
``ResilientClient`` forwards every call to a ``MilvusClient`` and, on those two
failures only, builds a new client (at most once per ``reconnect_every_s``, so
a dead server costs no connection timeout per call) or loads the collection,
then retries the call once. Our writes are upserts and deletes by id, so a
retry cannot duplicate a row. Errors still out of reach reach the gallery,
which reports UNAVAILABLE with a retry hint.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from biolit_id.index.base import GalleryError

log = logging.getLogger(__name__)

# Words of pymilvus' messages for "no server there" and "restarted, not loaded yet".
_GONE = ("fail connecting", "server unavailable", "connection refused", "unavailable",
         "deadline exceeded", "connect failed", "closed channel", "channel closed")
_RELEASED = ("call load() before", "not loaded", "state 'released'", "collection not loaded")


class MilvusUnreachableError(GalleryError):
    """Milvus did not answer (UNAVAILABLE, with a retry hint); the message says since when."""


def failure_kind(exc: BaseException) -> str | None:
    """"gone", "released" or None (any other error: not ours to recover from)."""
    text = str(exc).lower()
    if any(word in text for word in _RELEASED):
        return "released"
    if any(word in text for word in _GONE):
        return "gone"
    return None


class ResilientClient:
    def __init__(self, factory: Callable[[float], Any], uri: str,
                 connect_timeout_s: float = 10.0, reconnect_timeout_s: float = 2.0,
                 reconnect_every_s: float = 1.0) -> None:
        self._factory = factory
        self._uri = uri
        self._reconnect_timeout_s = reconnect_timeout_s
        self._reconnect_every_s = reconnect_every_s
        self._lock = threading.Lock()
        self._last_attempt = 0.0
        self._down_since: float | None = None
        self._client = factory(connect_timeout_s)

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            for attempt in range(3):  # reconnect, then load, then give up
                client = self._client
                try:
                    result = getattr(client, name)(*args, **kwargs)
                except Exception as exc:
                    kind = failure_kind(exc)
                    if kind is None or attempt == 2:
                        raise
                    if kind == "gone":
                        self._reconnect(client, exc)
                    else:
                        self._load(args, kwargs)
                    continue
                if self._down_since is not None:
                    log.info("Milvus at %s is back after %.1f s", self._uri,
                             time.monotonic() - self._down_since)
                    self._down_since = None
                return result
            raise AssertionError("unreachable")

        return call

    def _reconnect(self, failed: Any, exc: Exception) -> None:
        with self._lock:
            if self._client is not failed:  # another thread has reconnected meanwhile
                return
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
                log.warning("Milvus at %s unreachable (%s); reconnecting", self._uri, exc)
            if now - self._last_attempt < self._reconnect_every_s:
                raise MilvusUnreachableError(
                    f"Milvus at {self._uri} unreachable for {now - self._down_since:.0f} s "
                    f"({exc})") from exc
            self._last_attempt = now
            try:
                self._client = self._factory(self._reconnect_timeout_s)
            except Exception as again:
                raise MilvusUnreachableError(
                    f"Milvus at {self._uri} unreachable for {now - self._down_since:.0f} s "
                    f"({again})") from again
            with contextlib.suppress(Exception):  # the old channel is dead anyway
                failed.close()

    def _load(self, args: tuple, kwargs: dict) -> None:
        name = kwargs.get("collection_name") or (args[0] if args and isinstance(args[0], str)
                                                 else None)
        if name is None:
            raise MilvusUnreachableError(f"Milvus at {self._uri} has a collection unloaded")
        log.info("Milvus collection %s was released (server restarted?); loading it", name)
        self._client.load_collection(name)
