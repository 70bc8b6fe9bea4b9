"""Which gRPC status each error becomes: one table, applied by one interceptor.

Servicers raise; ``ErrorInterceptor`` turns what they raise into the status of
the first matching row, so the same failure never gets two codes depending on
which RPC met it. ``error_context`` adds where it happened ("message 3: ...")
without changing the code. IdentifyStream reports an item's error inside its
response with the same table (``status_for``/``message_of``).
Unlisted exceptions are bugs: they pass through and gRPC reports UNKNOWN.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from biolit_id.index.base import (
    GalleryError,
    SpeciesExistsError,
    UnknownExemplarError,
    UnknownSpeciesError,
)
from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.server.catalog.catalog import UnknownTaxonError
from biolit_id.server.catalog.gbif_http import GbifError, GbifUnavailableError
from biolit_id.server.grpc.observability import wrap_handler
from biolit_id.server.inference.batcher import (
    BatcherClosedError,
    DeadlineExceededError,
    QueueFullError,
)
from biolit_id.server.inference.preprocess import ImageDecodeError

log = logging.getLogger(__name__)
Code = grpc.StatusCode


class NotFoundError(LookupError):
    """A name or id the request refers to does not exist (its message says which)."""


class NoGalleryError(RuntimeError):
    """A curation RPC on a server started without a gallery."""

    def __init__(self) -> None:
        super().__init__("this server runs without a gallery")


class ContextualError(Exception):
    """A mapped error plus where it happened; reported with the cause's code."""

    def __init__(self, cause: BaseException, prefix: str = "", suffix: str = "") -> None:
        super().__init__(cause)
        self.cause, self.prefix, self.suffix = cause, prefix, suffix


def message_of(exc: BaseException) -> str:
    """The error's own sentence (KeyError's str() would add quotes)."""
    return str(exc.args[0]) if exc.args else str(exc)


def disk_full(exc: BaseException) -> bool:
    """ENOSPC from a file write, or SQLite's SQLITE_FULL (its own write met ENOSPC)."""
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
            "database or disk is full" in str(exc))
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


RETRY_AFTER_S = 2.0  # what a client should wait before retrying a backend that is away
DISK_FULL_MESSAGE = ("the server's disk is full: this photo was not stored; free space on "
                     "the data directory and retry")


@dataclass(frozen=True)
class Rule:
    errors: tuple[type[BaseException], ...]
    code: grpc.StatusCode
    message: Callable[[BaseException], str] = message_of
    when: Callable[[BaseException], bool] | None = None  # only errors it accepts
    retry_after_s: float | None = None  # sent as trailing metadata "retry-after-s"

    def matches(self, exc: BaseException) -> bool:
        return isinstance(exc, self.errors) and (self.when is None or self.when(exc))


# First match wins: subclasses before their bases.
TABLE: tuple[Rule, ...] = (
    # The client's request is wrong; the message says which field.
    Rule((InvalidRequestError, ImageDecodeError), Code.INVALID_ARGUMENT),
    Rule((UnknownSpeciesError, UnknownExemplarError, NotFoundError), Code.NOT_FOUND),
    Rule((UnknownTaxonError,), Code.NOT_FOUND, lambda e: f"unknown taxon {message_of(e)!r}"),
    Rule((SpeciesExistsError,), Code.ALREADY_EXISTS),
    Rule((NoGalleryError,), Code.UNIMPLEMENTED),
    # Nothing was done and the call can be retried.
    Rule((GbifUnavailableError,), Code.UNAVAILABLE,
         lambda e: f"GBIF look-up failed ({e}); retry, or send the taxonomy"),
    Rule((GbifError,), Code.FAILED_PRECONDITION,
         lambda e: f"GBIF answered unexpectedly ({e}); send the taxonomy"),
    Rule((GalleryError,), Code.UNAVAILABLE,
         lambda e: f"{message_of(e)}; retry in a few seconds", retry_after_s=RETRY_AFTER_S),
    Rule((QueueFullError,), Code.RESOURCE_EXHAUSTED),
    Rule((MemoryError,), Code.RESOURCE_EXHAUSTED,
         lambda e: "the server is out of memory for this photo; retry later"),
    Rule((DeadlineExceededError,), Code.DEADLINE_EXCEEDED),
    Rule((BatcherClosedError,), Code.UNAVAILABLE),
    # Writes refused by a full disk: nothing of this request was kept; retry once freed.
    Rule((sqlite3.OperationalError, OSError), Code.RESOURCE_EXHAUSTED,
         lambda e: DISK_FULL_MESSAGE, when=disk_full),
)
HANDLED_ERRORS: tuple[type[BaseException], ...] = tuple(
    cls for rule in TABLE for cls in rule.errors
)
# What a caller of a servicer method catches before asking ``status_of`` (the HTTP bridge).
MAPPED_ERRORS: tuple[type[BaseException], ...] = (*HANDLED_ERRORS, ContextualError)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, message) for a mapped error, None for one the table does not know."""
    if isinstance(exc, ContextualError):
        inner = status_of(exc.cause)
        return None if inner is None else (inner[0], f"{exc.prefix}{inner[1]}{exc.suffix}")
    rule = rule_of(exc)
    return None if rule is None else (rule.code, rule.message(exc))


def status_for(exc: BaseException) -> grpc.StatusCode:
    found = status_of(exc)
    if found is None:
        raise TypeError(f"{type(exc).__name__} is not in the error table") from exc
    return found[0]


@contextlib.contextmanager
def error_context(prefix: str = "", suffix: str = "") -> Iterator[None]:
    """Mapped errors raised inside get ``prefix``/``suffix`` around their message."""
    try:
        yield
    except HANDLED_ERRORS as exc:
        if status_of(exc) is None:  # e.g. an OSError that is not ENOSPC: a bug, as it is
            raise
        raise ContextualError(exc, prefix, suffix) from exc


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    found = status_of(exc)
    if found is None:
        raise exc
    rule = rule_of(exc)
    if rule is not None and rule.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-s", f"{rule.retry_after_s:g}"),))
    context.abort(*found)


def rule_of(exc: BaseException) -> Rule | None:
    if isinstance(exc, ContextualError):
        return rule_of(exc.cause)
    return next((rule for rule in TABLE if rule.matches(exc)), None)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Innermost interceptor: every servicer's mapped errors become their status."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def wrap_unary(behavior):
            def mapped(request, context):
                try:
                    return behavior(request, context)
                except MAPPED_ERRORS as exc:
                    _abort(context, exc)
            return mapped

        def wrap_streaming(behavior):
            def mapped(request, context):
                try:
                    yield from behavior(request, context)
                except MAPPED_ERRORS as exc:
                    _abort(context, exc)
            return mapped

        return wrap_handler(handler, wrap_unary, wrap_streaming)
