"""Species added at runtime, as ``AddExemplars`` brings them: the gallery's prototype builder
and the kNN term over their photos, applied to a bundle offline (tests and benchmarks)."""

from __future__ import annotations

import numpy as np

from biolit_id.cli.training.datasets import EmbeddingSet
from biolit_id.index.core.types import PrototypeSet
from biolit_id.index.prototypes import PrototypeBuilder
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import Bundle
from biolit_id.server.decision.fused import RUNTIME_PHOTOS, neighbour_similarity


def without(data: EmbeddingSet, species: set[str]) -> EmbeddingSet:
    """``data`` without the photos of ``species``."""
    return data.subset([i for i, s in enumerate(data.species) if s not in species])


def add_at_runtime(bundle: Bundle, train: EmbeddingSet, species: list[str], loaded,
                   catalog: Catalog):
    """(PrototypeSet, neighbours) after 20 photos of each species came in by AddExemplars:
    the gallery's prototype builder, and the kNN term over those photos."""
    def text_for(names: list[str]) -> np.ndarray:
        return bundle.whiten(loaded.encode_text([catalog.prompt_for(n) for n in names]))

    builder = PrototypeBuilder(base_names=tuple(bundle.species), base_vectors=bundle.prototypes,
                               text_for=text_for, alpha=bundle.alpha,
                               visual_prior=bundle.visual_prototypes,
                               text_base=bundle.text_prototypes,
                               iterations=bundle.prototype_iterations)
    photos = {}
    vectors = [bundle.prototypes]
    for name in species:
        rows = [i for i, s in enumerate(train.species) if s == name][:RUNTIME_PHOTOS]
        photos[name] = bundle.whiten(train.embeddings[rows])
        vectors.append(builder.fused(name, photos[name])[None, :])
    protos = PrototypeSet((*bundle.species, *species), np.concatenate(vectors).astype(np.float32))

    def neighbours(embeddings: np.ndarray, names) -> np.ndarray:
        return neighbour_similarity(bundle.whiten(embeddings),
                                    [photos.get(n, np.zeros((0, protos.vectors.shape[1])))
                                     for n in names])

    return protos, neighbours
