"""Synthetic labelled data for the training/calibration/evaluation tests.

Two generators: feature-level embeddings with the catalog's real taxonomy
(congeneric species lie close, so rank-level answers mean something), and
small synthetic photos whose classes differ in colour and pattern, so even
the random-init demo model separates them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from biolit_id.cli.training.datasets import EmbeddingSet
from biolit_id.server.catalog.catalog import LINEAGE_RANKS, Catalog

# Norm of each rank's offset: congeneric species share everything above genus.
RANK_SCALE = {"kingdom": 0.0, "phylum": 1.0, "class": 0.9, "order": 0.8, "family": 0.7,
              "genus": 0.6, "species": 1.0}


def longtail_features(seed: int = 0, dim: int = 512, common_range=(80, 160),
                      rare_range=(10, 50), noise: float = 0.06, ambiguous: float = 0.06
                      ) -> EmbeddingSet:
    """The 100 catalog species: 50 common (80-160 photos), 50 rare (10-50 photos).

    Each species' centre is the sum of random offsets along its lineage. A
    share ``ambiguous`` of the photos of species with a congener sit halfway
    between the two species (the real Littorina problem): the species cannot
    be told, the genus can.
    """
    rng = np.random.default_rng(seed)
    catalog = Catalog.load_default().of_generation("v4")  # the first seed's 100 species
    offsets: dict[tuple[str, str], np.ndarray] = {}

    def offset(rank: str, name: str) -> np.ndarray:
        key = (rank, name)
        if key not in offsets:
            v = rng.normal(size=dim)
            offsets[key] = v / np.linalg.norm(v) * RANK_SCALE[rank]
        return offsets[key]

    records = list(catalog)
    centres = {
        r.scientific_name: sum(offset(rank, r.taxonomy.get(rank, r.scientific_name))
                               for rank in LINEAGE_RANKS)
        for r in records
    }
    by_genus: dict[str, list[str]] = {}
    for r in records:
        by_genus.setdefault(r.taxon_at("genus"), []).append(r.scientific_name)
    species, rows = [], []
    for r in records:
        lo, hi = common_range if r.common else rare_range
        n = int(rng.integers(lo, hi + 1))
        congeners = [s for s in by_genus.get(r.taxon_at("genus"), []) if s != r.scientific_name]
        for _ in range(n):
            centre = centres[r.scientific_name]
            if congeners and rng.random() < ambiguous:
                centre = 0.5 * (centre + centres[congeners[int(rng.integers(len(congeners)))]])
            rows.append(centre + rng.normal(scale=noise, size=dim))
            species.append(r.scientific_name)
    emb = np.asarray(rows, dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return EmbeddingSet(species, emb, [f"synthetic/{i}" for i in range(len(species))])


PALETTE = [
    (220, 30, 30), (30, 200, 40), (30, 60, 230), (240, 220, 20), (240, 20, 230),
    (20, 230, 230), (250, 140, 0), (120, 0, 200), (255, 255, 255), (10, 10, 10),
    (120, 120, 120), (140, 80, 20),
]


def synthetic_photo(class_index: int, rng: np.random.Generator, size: int = 96) -> bytes:
    """A class-specific colour and pattern (stripes/checks/dots) with per-photo jitter."""
    colour = np.asarray(PALETTE[class_index % len(PALETTE)], dtype=np.float64)
    other = np.asarray(PALETTE[(class_index * 5 + 3) % len(PALETTE)], dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size]
    period = 8 + 4 * (class_index % 4)
    phase = rng.integers(0, period)
    kind = class_index % 3
    if kind == 0:
        mask = ((xx + phase) // period) % 2 == 0
    elif kind == 1:
        mask = (((xx + phase) // period) + ((yy + phase) // period)) % 2 == 0
    else:
        mask = ((xx + phase) % period - period / 2) ** 2 + ((yy + phase) % period
                                                            - period / 2) ** 2 < (period / 3) ** 2
    arr = np.where(mask[..., None], colour, 0.6 * colour + 0.4 * other)
    arr = arr * rng.uniform(0.85, 1.15) + rng.normal(0, 10, size=arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def write_photo_set(root: Path, names: list[str], counts: list[int], seed: int = 0) -> Path:
    """Photos under ROOT/photos/ and a manifest ROOT/manifest.csv (relative paths)."""
    rng = np.random.default_rng(seed)
    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    lines = ["image,species"]
    for c, (name, n) in enumerate(zip(names, counts, strict=True)):
        for i in range(n):
            rel = f"photos/c{c:02d}_{i:03d}.png"
            (root / rel).write_bytes(synthetic_photo(c, rng))
            lines.append(f'{rel},"{name}"')
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n", "utf-8")
    return manifest
