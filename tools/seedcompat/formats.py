"""The BioLit seed's file conventions, in one place.

The seed's users have scripts and spreadsheets built on its CSV
(``docs/seed-v4.md``, "Output CSV"): column names, method spellings, the ``?``
for a rejection and the French rank names must stay exactly as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from biolit_id.server.decision.types import SEED_METHOD_NAMES, Method
from biolit_id.server.inference.preprocess import CLIP_MEAN, CLIP_STD

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


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation",
                      "(1) In PyTorch", "(2) Alternatively")


def unpickler_reason(exc: Exception) -> str:
    """The useful part of torch's long weights_only message (which global, which opcode)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)]
    reason = " ".join(useful) or (lines[-1] if lines else type(exc).__name__)
    reason = reason.split("WeightsUnpickler error:")[-1].strip()
    return reason.split(" Please use `torch.serialization")[0]


def seed_file(path: Path) -> Path:
    """``path`` as a Path, refused before any reader touches it when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise SeedImportError(f"{path}: no such file")
    return path


def numpy_reconstruct() -> tuple:
    """numpy's array-rebuild global, allow-listed under the name numpy 2 pickles it as.

    The seed's files were written with numpy 2 (``numpy._core``); the explicit
    name keeps them loadable where ``_reconstruct`` lives elsewhere.
    """
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return (_reconstruct, "numpy._core.multiarray._reconstruct")


def safe_torch_load(path: Path, allowed_globals: Sequence) -> dict:
    """A torch pickle as a dict, never executing code from the file.

    ``weights_only=True`` plus exactly ``allowed_globals``: anything else the
    file names is refused with the reason torch gives.
    """
    import pickle

    import torch

    path = seed_file(path)
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            data = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise SeedImportError(
            f"{path} was refused by the safe loader (it names a global that is not "
            f"allow-listed, or is not a torch file): {unpickler_reason(exc)}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise SeedImportError(f"{path} is not a readable torch file: {exc}") from exc
    if not isinstance(data, dict):
        raise SeedImportError(f"{path} holds a {type(data).__name__}, expected a dict")
    return data


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

# The seed v2 predictions.csv columns (docs/seed-v2.md), in this order.
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
