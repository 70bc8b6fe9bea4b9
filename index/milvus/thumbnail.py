"""Thumbnails as Milvus VARCHARs: Milvus has no BLOB type, so they are base64 text.

A VARCHAR holds at most 65,535 characters; the server's thumbnails are small
JPEGs that fit, and the rare one that does not (a large PNG sent by a client)
is re-encoded smaller rather than refused.
"""

from __future__ import annotations

import base64
import io
import logging

log = logging.getLogger(__name__)

THUMBNAIL_MAX_CHARS = 65535  # Milvus VARCHAR limit
_STEPS = ((70, 256), (55, 224), (40, 192), (30, 128))  # (JPEG quality, longest side)


def encode_thumbnail(data: bytes) -> str:
    """Base64 that fits a VARCHAR: re-encoded smaller when the image is unusually large."""
    text = base64.b64encode(data or b"").decode("ascii")
    if len(text) <= THUMBNAIL_MAX_CHARS:
        return text
    from PIL import Image  # only for the rare oversized one: the gallery does not load PIL

    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert("RGB")
    for quality, side in _STEPS:
        small = img.copy()
        small.thumbnail((side, side))
        out = io.BytesIO()
        small.save(out, format="JPEG", quality=quality, optimize=True)
        text = base64.b64encode(out.getvalue()).decode("ascii")
        if len(text) <= THUMBNAIL_MAX_CHARS:
            log.info("thumbnail re-encoded (q%d, %d px) to fit Milvus's VARCHAR", quality, side)
            return text
    raise ValueError("thumbnail too large even after re-encoding")


def decode_thumbnail(text: str) -> bytes:
    return base64.b64decode(text) if text else b""
