"""Photo bytes -> model input tensor, safely and fast.

The seed's preprocessing (squash to 224 x 224, CLIP mean/std), plus EXIF
orientation, since phone photos are often stored sideways, and a reduced-scale
JPEG decode before the exact resize, since decode dominates a large photo's
cost. The pixel budget is checked from the header, so a decompression bomb
costs nothing. Measurements: docs/performance.md ("Fast decode").
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 50_000_000  # a 12-Mpx phone photo is far below; a bomb is far above
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
# The PIL openers allowed to parse a photo; JPEG's also yields MPO (multi-picture) files.
OPENERS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageDecodeError(ValueError):
    """The bytes are not a photo this service can read; the message says why."""


@dataclass(frozen=True)
class ImagePolicy:
    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_pixels: int = DEFAULT_MAX_PIXELS
    fast_decode: bool = True


def open_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Decode to an upright RGB image within the pixel budget.

    Only the listed formats' parsers ever see the bytes (``formats=``), so a
    photo cannot reach PIL's rarer plugins (EPS would even start Ghostscript).
    The budget is checked on the header's declared size, before any pixel is
    decoded. Multi-frame images (animated GIF/WebP, multi-page TIFF, MPO)
    use their first frame. Alpha is composited on white; palette, CMYK,
    greyscale and 16-bit images are converted to 8-bit RGB.
    Any failure of a decoder becomes ImageDecodeError (INVALID_ARGUMENT):
    hostile bytes must never surface as an internal error.
    """
    if not data:
        raise ImageDecodeError("image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=OPENERS)
    except Image.DecompressionBombError:
        # PIL's own guard (on the declared size too) fired before ours could.
        raise ImageDecodeError(
            f"image declares more pixels than the {policy.max_pixels}-pixel budget "
            "(refused before decoding)"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            "bytes are not a supported image (expected JPEG, PNG, WebP, GIF, BMP or TIFF)"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"cannot read image header: {_short(exc)}") from None
    if img.format not in SUPPORTED_FORMATS:
        raise ImageDecodeError(f"unsupported image format {img.format}")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > policy.max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, over the "
            f"{policy.max_pixels}-pixel budget (refused before decoding)"
        )
    try:
        with _DECODING.hold(width * height, 2 * policy.max_pixels):
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # first frame; the others are never decoded
            if policy.fast_decode and img.format in {"JPEG", "MPO"}:
                # Decode at the smallest DCT scale that keeps >= 2x the target size.
                target = 2 * policy.image_size
                img.draft("RGB", (target, target))
            img.load()
            img = ImageOps.exif_transpose(img)
            if policy.fast_decode:  # before the conversion when the mode allows, else after
                return _reduce(to_rgb(_reduce(img, policy.image_size)), policy.image_size)
            return to_rgb(img)
    except MemoryError:
        raise
    except Exception as exc:  # truncated data, corrupt streams, odd modes
        raise ImageDecodeError(f"image data is corrupt or truncated: {_short(exc)}") from None


class PixelBudget:
    """Bounds the pixels being decoded at once, across all threads.

    A 100 KB PNG may declare 50 Mpx that expand to ~1 GB while decoded and
    converted; a dozen such photos arriving together must wait for each other
    rather than exhaust memory. Photos under the budget never wait for long:
    a decode takes milliseconds.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_use = 0

    @contextmanager
    def hold(self, pixels: int, capacity: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._in_use == 0 or self._in_use + pixels <= capacity)
            self._in_use += pixels
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= pixels
                self._cond.notify_all()


_DECODING = PixelBudget()
REDUCIBLE_MODES = frozenset({"RGB", "RGBA", "L", "LA", "CMYK"})


def _reduce(img: Image.Image, image_size: int) -> Image.Image:
    """Box-reduce to at least twice the model's size before any conversion.

    Done here, inside the pixel budget, so that full-size copies never leave
    the decoder: the colour conversion and the final exact resize work on a
    photo of ~0.2-1 Mpx instead of 12.
    """
    factor = min(img.width // (2 * image_size), img.height // (2 * image_size))
    if factor >= 2 and img.mode in REDUCIBLE_MODES:
        return img.reduce(factor)
    return img


def _short(exc: Exception, limit: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in SIXTEEN_BIT_MODES or mode in {"I", "F"}:
        img = Image.fromarray(_to_uint8(np.asarray(img), mode), "L")
        return img.convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Greyscale of 16 or 32 bits per pixel -> 8 bits, keeping brightness.

    16-bit data is scaled by its full range (65535 -> 255), not by its own
    peak: a dim 16-bit photo must stay dim. ``I`` (32-bit int) holds 16-bit
    PNG/TIFF data in practice, so it gets the same scale, unless its values
    fit 8 bits (kept) or exceed 16 bits (scaled by the peak); float images
    are taken as 0..1 when they fit, else 0..255.
    """
    values = arr.astype(np.float64)
    if mode in SIXTEEN_BIT_MODES:
        values = values / 257.0
    elif mode == "I":
        peak = float(values.max()) if values.size else 0.0
        if peak > 65535:
            values = values * (255.0 / peak)
        elif peak > 255:
            values = values / 257.0
    elif values.size and float(np.nanmax(np.abs(values))) <= 1.0:  # "F" in 0..1
        values = values * 255.0
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def resize_for_model(img: Image.Image, policy: ImagePolicy) -> Image.Image:
    """The exact ``Resize((224, 224))`` (already box-reduced by ``open_image``)."""
    size = policy.image_size
    return img.resize((size, size), Image.BILINEAR)


def to_array(img: Image.Image, policy: ImagePolicy) -> np.ndarray:
    """[3, H, W] float32, normalised with the model's mean/std."""
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(policy.mean, dtype=np.float32)) / np.asarray(
        policy.std, dtype=np.float32
    )
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(data: bytes, policy: ImagePolicy) -> np.ndarray:
    return to_array(resize_for_model(open_image(data, policy), policy), policy)


def thumbnail_jpeg(img: Image.Image, max_side: int = 256, quality: int = 80) -> bytes:
    """A small JPEG for galleries and contact sheets (long side <= max_side)."""
    thumb = img.copy()
    thumb.thumbnail((max_side, max_side), Image.BILINEAR)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()
