"""Milvus failures as the gallery's own errors, translated in one place.

pymilvus raises its own exception types (and plain gRPC or connection errors);
the servicer maps only the gallery's types to status codes, so every call into
Milvus goes through ``milvus_errors`` instead of a ``try``/``except`` of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from biolit_id.index.base import GalleryConfigError, GalleryError


class MilvusConfigError(GalleryConfigError):
    """A --gallery milvus value that cannot be used; the message says how to fix it."""


class MilvusGalleryError(GalleryError):
    """Milvus refused or failed an operation the gallery needs (RPCs: UNAVAILABLE)."""


@contextmanager
def milvus_errors(what: str) -> Iterator[None]:
    """Turn any failure inside the block into ``MilvusGalleryError("Milvus <what> failed")``.

    Errors that are already the gallery's (a configuration mistake, Milvus
    unreachable after a reconnect attempt) pass through unchanged. Also usable
    as a decorator: ``@milvus_errors("upsert")``.
    """
    try:
        yield
    except (GalleryError, GalleryConfigError):
        raise
    except Exception as exc:
        raise MilvusGalleryError(f"Milvus {what} failed: {exc}") from exc
