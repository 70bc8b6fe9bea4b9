"""Photos as our own clients send them: downsized before upload.

The service decodes every photo to 224 x 224; a 3 MB phone photo costs the
network, the server's decoder and its memory budget for nothing. Clients
draft-decode to a short side of ``UPLOAD_SHORT_SIDE`` px and re-encode as JPEG,
upright (EXIF orientation applied, metadata dropped). What this changes in
the answers is measured by ``biolit-id bench`` and written in docs/api.md.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

from biolit_id.server.inference.preprocess import OPENERS, to_rgb

UPLOAD_SHORT_SIDE = 448
UPLOAD_QUALITY = 90


def downsize_for_upload(data: bytes, short_side: int = UPLOAD_SHORT_SIDE,
                        quality: int = UPLOAD_QUALITY) -> bytes:
    """JPEG bytes with a short side of at most ``short_side``; the original when it is
    already that small, or when it is not a photo we can read (the server says why)."""
    try:
        img = Image.open(io.BytesIO(data), formats=OPENERS)
        width, height = img.size
        if min(width, height) <= short_side:
            return data
        scale = short_side / min(width, height)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        if img.format in {"JPEG", "MPO"}:
            img.draft("RGB", target)  # DCT-domain reduction: decodes far fewer pixels
        img = to_rgb(ImageOps.exif_transpose(img))
        width, height = img.size
        scale = short_side / min(width, height)
        img = img.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                         Image.BICUBIC, reducing_gap=2.0)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=quality)
        return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):
        return data
