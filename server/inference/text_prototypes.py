"""Text prototypes: each species' prompt through the model's text tower, cached.

The cache is keyed by the model's fingerprint and each prompt's hash, so a
restart reuses every vector, a new species costs one forward pass, and a
different model never reads another model's vectors.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import numpy as np

from biolit_id.index.core.atomic import atomic_open
from biolit_id.server.inference.model_loader import LoadedModel

log = logging.getLogger(__name__)


def _key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def _load(path: Path, dim: int) -> dict[str, np.ndarray]:
    """The cached vectors; raises when the file is damaged. The zip's CRCs catch flipped
    or missing bytes; the checks below catch a file that unzips into the wrong shape."""
    with np.load(path, allow_pickle=False) as data:
        keys, vectors = data["keys"], data["vectors"]
    if vectors.ndim != 2 or vectors.shape != (len(keys), dim):
        raise ValueError(f"vectors {vectors.shape} for {len(keys)} keys of {dim}-d")
    if not np.isfinite(vectors).all():
        raise ValueError("non-finite values")
    norms = np.linalg.norm(vectors, axis=1)
    if len(norms) and not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError("vectors are not unit length")
    return {str(k): v for k, v in zip(keys, vectors, strict=True)}


class TextPrototypeCache:
    def __init__(self, model: LoadedModel, cache_dir: Path | None) -> None:
        self._model = model
        self._path = (
            Path(cache_dir) / "text-prototypes" / f"{model.fingerprint}.npz" if cache_dir else None
        )
        self._lock = threading.Lock()
        self._vectors: dict[str, np.ndarray] = {}
        if self._path is not None and self._path.is_file():
            try:
                self._vectors = _load(self._path, model.embedding_dim)
            except Exception as exc:  # derived data: never worth refusing to start
                log.warning("text prototype cache %s is corrupt (%s): recomputing it from "
                            "the model", self._path, exc)
                self._vectors = {}
        self.computed = 0  # prompts embedded since start (tests check the cache works)

    def embed(self, prompts: list[str]) -> np.ndarray:
        """[N, D] normalised text embeddings, computing only the missing ones."""
        with self._lock:
            missing = sorted({p for p in prompts if _key(p) not in self._vectors})
            if missing:
                vectors = self._model.encode_text(missing)
                for prompt, vec in zip(missing, vectors, strict=True):
                    self._vectors[_key(prompt)] = vec
                self.computed += len(missing)
                self._save()
            if not prompts:
                return np.zeros((0, self._model.embedding_dim), dtype=np.float32)
            return np.stack([self._vectors[_key(p)] for p in prompts]).astype(np.float32)

    def _save(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(sorted(self._vectors))
        with atomic_open(self._path) as f:
            np.savez(f, keys=keys, vectors=np.stack([self._vectors[k] for k in keys]))
