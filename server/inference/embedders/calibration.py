"""Photos the exported runtimes are quantised on and gated against.

Offline there are no real photos, so deterministic synthetic ones stand in;
a deployment passes real ones (``--calibration-dir``) where it matters (int8).
The set's identity is part of every cache key that depends on it.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from biolit_id.server.inference.embedders.base import RuntimeUnavailableError
from biolit_id.server.inference.model_loader import LoadedModel
from biolit_id.server.inference.preprocess import ImageDecodeError, ImagePolicy, preprocess

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 16
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


def synthetic_photos(count: int, size: tuple[int, int] = (640, 480), seed: int = 0,
                     quality: int = 90) -> list[bytes]:
    """Deterministic photo-like JPEGs: gradients, shapes, edges and sensor noise.

    They exercise the value ranges and spatial frequencies a ViT sees in
    field photos, without shipping any.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(count):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
        base = rng.uniform(30, 220, size=3).astype(np.float32)
        grad = rng.uniform(-120, 120, size=(2, 3)).astype(np.float32)
        arr = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 12))):
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            rx, ry = rng.uniform(0.03, 0.3) * w, rng.uniform(0.03, 0.3) * h
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            box = (x0 - rx, y0 - ry, x0 + rx, y0 + ry)
            if rng.random() < 0.5:
                draw.ellipse(box, fill=colour)
            else:
                draw.rectangle(box, fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
        noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, size=(h, w, 3)).astype(np.int16)
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def image_files(folder: Path, limit: int | None = None) -> list[Path]:
    """Photos under ``folder`` (recursively), in a stable order."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit] if limit else files


def calibration_pixels(loaded: LoadedModel, folder: Path | None = None,
                       count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """[N, 3, H, W] model inputs: photos from ``folder``, else synthetic ones."""
    policy = ImagePolicy(image_size=loaded.image_size, mean=loaded.mean, std=loaded.std)
    if folder is None:
        photos = synthetic_photos(count)
    else:
        photos = [p.read_bytes() for p in image_files(folder, count)]
        if not photos:
            raise RuntimeUnavailableError(f"no photos in calibration folder {folder}")
    arrays = []
    for data in photos:
        try:
            arrays.append(preprocess(data, policy))
        except ImageDecodeError as exc:
            log.warning("calibration: skipping unreadable photo: %s", exc)
    return np.stack(arrays)


def calibration_tag(folder: Path | None) -> str:
    """Short identity of a calibration set, part of an int8 artifact's cache key."""
    if folder is None:
        return f"synthetic{CALIBRATION_IMAGES}"
    digest = hashlib.sha256()
    for path in image_files(folder, CALIBRATION_IMAGES):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return "photos-" + digest.hexdigest()[:10]
