"""Our clients downsize photos before sending; the model must see nearly the same input."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from biolit_id.cli.client.upload import UPLOAD_SHORT_SIDE, downsize_for_upload
from biolit_id.server.inference.preprocess import ImagePolicy, preprocess
from conftest import photo_bytes


def _rotated_jpeg(size: tuple[int, int]) -> bytes:
    """A landscape JPEG whose EXIF says 'rotate 90°' (how phones store portraits)."""
    img = Image.open(io.BytesIO(photo_bytes(3, size=size)))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


def test_large_photo_becomes_an_upright_jpeg_of_the_upload_size() -> None:
    original = _rotated_jpeg((3000, 2250))
    small = downsize_for_upload(original)
    img = Image.open(io.BytesIO(small))
    assert img.format == "JPEG"
    assert min(img.size) == UPLOAD_SHORT_SIDE
    assert img.size[1] > img.size[0]  # EXIF rotation applied: portrait now
    assert img.getexif().get(0x0112) in (None, 1)
    assert len(small) < len(original) / 5


def test_the_model_input_barely_changes() -> None:
    policy = ImagePolicy()
    original = _rotated_jpeg((3000, 2250))
    a = preprocess(original, policy).ravel()
    b = preprocess(downsize_for_upload(original), policy).ravel()
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cosine > 0.99, cosine


def test_small_photos_and_non_images_are_sent_unchanged() -> None:
    small = photo_bytes(1, size=(400, 300))
    assert downsize_for_upload(small) == small
    junk = b"%PDF-1.7 not a photo"
    assert downsize_for_upload(junk) == junk
