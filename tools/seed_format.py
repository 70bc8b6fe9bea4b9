"""The BioLit seed's file conventions, in one place.

The seed's users have scripts and spreadsheets built on its CSV
(``docs/seed-v4.md``, "Output CSV"): column names, method spellings, the ``?``
for a rejection and the French rank names must stay exactly as they were.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from biolit_id.server.preprocess import CLIP_MEAN, CLIP_STD
from biolit_id.server.routing import SEED_METHOD_NAMES, Method

# Both generations' image preprocessing (docs/seed-v4.md "Embedding"; docs/seed-v2.md for
# v2): squash, CLIP constants.
SEED_PREPROCESSING = {
    "resize": "squash",  # Resize((224, 224)), no centre crop
    "image_size": 224,
    "mean": list(CLIP_MEAN),
    "std": list(CLIP_STD),
}


class SeedImportError(ValueError):
    """The seed files cannot be imported as they are; the message says why."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation",
                      "(1) In PyTorch", "(2) Alternatively")


def unpickler_reason(exc: Exception) -> str:
    """The useful part of torch's long weights_only message (which global, which opcode)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)]
    reason = " ".join(useful) or (lines[-1] if lines else type(exc).__name__)
    reason = reason.split("WeightsUnpickler error:")[-1].strip()
    return reason.split(" Please use `torch.serialization")[0]

# docs/seed-v4.md, "Output CSV", in this order.
SEED_COLUMNS: tuple[str, ...] = (
    "image",
    "espece_pred",
    "confiance",
    "methode",
    "top1_common",
    "conf_common",
    "top2_common",
    "top3_common",
    "top1_proto",
    "conf_proto",
    "top2_proto",
    "top3_proto",
)

# The seed's rank names (v6 taxonomy columns) -> catalog ranks, finest first.
SEED_RANKS: dict[str, str] = {
    "genre": "genus",
    "famille": "family",
    "ordre": "order",
    "classe": "class",
    "embranchement": "phylum",
}

REJECTED_SPECIES = "?"
ERRORS_COLUMNS: tuple[str, ...] = ("image", "error")
CONFIDENCE_DECIMALS = 4


def taxonomy_columns() -> list[str]:
    """``pred_genre, conf_genre, pred_genre_2, conf_genre_2, ...`` (docs/seed-v4.md)."""
    columns = []
    for rank in SEED_RANKS:
        columns += [f"pred_{rank}", f"conf_{rank}", f"pred_{rank}_2", f"conf_{rank}_2"]
    return columns


def method_name(method: Method) -> str:
    return SEED_METHOD_NAMES[Method(method)]


def confidence_text(value: float | None) -> str:
    """Rounded like the seed's CSV; empty when the component did not run."""
    if value is None:
        return ""
    return f"{round(float(value), CONFIDENCE_DECIMALS):.{CONFIDENCE_DECIMALS}f}"


# ------------------------------------------------------------------ seed v2 (BioCLIP-2)

# ../shared/seed-v2/REFERENCE.md §7, predictions.csv, in this order.
SEED_V2_COLUMNS: tuple[str, ...] = (
    "image",
    "best_level",
    "best_label",
    "best_score",
    "margin",
    "path",
    "top1_espece",
    "conf_espece",
    "top2_espece",
)
V2_SPECIES_LEVEL = "species_name"
V2_REJECTED_LEVEL = "rejeté"
V2_REJECTED_LABEL = "—"
V2_PATH_SPECIES, V2_PATH_HEADS = "proto_clip", "mlp"


def v2_percent(value: float) -> str:
    """Python's ``.0%``, as the seed writes best_score ("67%")."""
    return f"{float(value):.0%}"


def v2_rounded_percent(value: float) -> str:
    """conf_espece: rounded to 4 decimals first, then ``.0%``."""
    return f"{round(float(value), 4):.0%}"


def v2_margin(value: float) -> str:
    """margin: rounded to 4 decimals, printed with 3."""
    return f"{round(float(value), 4):.3f}"


def read_feature_cache(path: Path) -> tuple[list[str], np.ndarray]:
    """The seed v2's ``bioclip_features.npz`` (image_paths, features): file names without
    their (Windows-style) folders, and the [N, D] float32 features. No pickle is allowed."""
    with np.load(path, allow_pickle=False) as npz:
        if not {"features", "image_paths"} <= set(npz.files):
            raise ValueError(f"{path}: expected arrays 'features' and 'image_paths', "
                             f"found {sorted(npz.files)}")
        features = np.asarray(npz["features"], dtype=np.float32)
        paths = [str(p) for p in npz["image_paths"]]
    if features.ndim != 2 or len(features) != len(paths):
        raise ValueError(f"{path}: {features.shape} features for {len(paths)} image paths")
    return [p.replace("\\", "/").rsplit("/", 1)[-1] for p in paths], features
