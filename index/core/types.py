"""Values the gallery hands the server and back: prototypes and similar-photo hits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biolit_id.index.core.exemplar import ExemplarMeta


@dataclass(frozen=True)
class PrototypeSet:
    """An immutable snapshot of the prototypes, swapped whole on every change.

    Readers grab the current object and keep a consistent view for the whole
    request, while writers build the next one: no lock on the read path.
    """

    names: tuple[str, ...]
    vectors: np.ndarray  # [S, P], rows L2-normalised, in the scoring space
    version: int = 0

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}


@dataclass(frozen=True)
class SimilarHit(ExemplarMeta):
    """One reference photo close to the query, with what a reply shows of it."""

    exemplar_id: int
    species: str
    score: float
    thumbnail: bytes = b""
