"""Which gRPC status each pipeline error becomes, in one table.

The servicer and the curation RPCs share it so the same failure never gets
two different codes depending on which RPC met it.
"""

from __future__ import annotations

import grpc

from biolit_id.server.batcher import BatcherClosedError, DeadlineExceededError, QueueFullError
from biolit_id.server.catalog import UnknownTaxonError
from biolit_id.server.pipeline import InvalidRequestError
from biolit_id.server.preprocess import ImageDecodeError

# Errors a client caused: INVALID_ARGUMENT with the error's own message.
CLIENT_ERRORS = (InvalidRequestError, ImageDecodeError, UnknownTaxonError)
# The model's queue is full, the deadline passed, or the server is stopping:
# the photo was not processed and the call can be retried.
EMBED_ERRORS: dict[type[Exception], grpc.StatusCode] = {
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    MemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    BatcherClosedError: grpc.StatusCode.UNAVAILABLE,
}
HANDLED_ERRORS = (*CLIENT_ERRORS, *EMBED_ERRORS)


def status_for(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, CLIENT_ERRORS):
        return grpc.StatusCode.INVALID_ARGUMENT
    return next(code for cls, code in EMBED_ERRORS.items() if isinstance(exc, cls))


def message_of(exc: Exception) -> str:
    """The error's own sentence (KeyError's str() would add quotes)."""
    if isinstance(exc, MemoryError):
        return "the server is out of memory for this photo; retry later"
    return str(exc.args[0]) if exc.args else str(exc)
