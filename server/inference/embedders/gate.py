"""The fidelity gate: a faster runtime must still be the same model.

Every calibration embedding must lie within ``GATE_COSINE`` cosine of eager
torch fp32. Results are cached next to the runtime's artifacts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from biolit_id.index.core.atomic import atomic_write
from biolit_id.index.core.vectors import l2_normalize
from biolit_id.server.inference.embedders.base import Embedder
from biolit_id.server.inference.embedders.calibration import calibration_pixels, calibration_tag
from biolit_id.server.inference.embedders.eager import TorchEmbedder
from biolit_id.server.inference.embedders.export import artifact_root
from biolit_id.server.inference.model_loader import LoadedModel

GATE_COSINE = 0.999


@dataclass
class Fidelity:
    runtime: str
    precision: str
    images: int
    cosine_min: float
    cosine_mean: float
    threshold: float
    passed: bool


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=1)


def fidelity(reference: np.ndarray, candidate: np.ndarray, runtime: str, precision: str,
             threshold: float = GATE_COSINE) -> Fidelity:
    """Every calibration embedding must be within ``threshold`` cosine of fp32."""
    cos = cosine_rows(reference, candidate)
    return Fidelity(runtime, precision, int(cos.size), float(cos.min()), float(cos.mean()),
                    threshold, bool(cos.min() >= threshold))


def embed_batched(embedder: Embedder, pixels: np.ndarray, batch_size: int = 8) -> np.ndarray:
    return np.concatenate(
        [embedder.embed(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    )


def reference_embeddings(loaded: LoadedModel, pixels: np.ndarray) -> np.ndarray:
    """What every runtime is compared with: eager torch fp32."""
    return embed_batched(TorchEmbedder(loaded, "fp32"), pixels)


def fidelity_gate(loaded: LoadedModel, embedder: Embedder, cache_dir: str | Path | None,
                  calibration_dir: Path | None = None,
                  reference: np.ndarray | None = None,
                  threshold: float = GATE_COSINE) -> Fidelity:
    """The gate for one runtime/precision, cached next to its artifacts."""
    record = _gate_record(loaded, embedder, cache_dir, calibration_dir)
    if record.is_file():
        data = json.loads(record.read_text("utf-8"))
        if data.get("threshold") == threshold:
            return Fidelity(**data)
    pixels = calibration_pixels(loaded, calibration_dir)
    if reference is None:
        reference = reference_embeddings(loaded, pixels)
    result = fidelity(reference, embed_batched(embedder, pixels),
                      embedder.runtime, embedder.precision, threshold)
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(record, json.dumps(asdict(result), indent=2))
    return result


def _gate_record(loaded: LoadedModel, embedder: Embedder, cache_dir: str | Path | None,
                 calibration_dir: Path | None) -> Path:
    tag = calibration_tag(calibration_dir)
    return artifact_root(loaded, cache_dir) / (
        f"gate-{embedder.runtime}-{embedder.precision}-{tag}.json")
