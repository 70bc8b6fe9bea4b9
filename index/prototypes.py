"""Per-species prototypes from reference photos, without retraining anything.

Visual prototype: the mean of the species' photos, similarity-weighted
(``core.vectors.weighted_prototype``, the seed's method) unless the bundle's
own recipe is the plain mean (``iterations`` 0, which ``train`` chooses when
it wins out of fold), so runtime species are built as trained ones. Weighting
needs every photo, so it is not what an add pays: each species keeps
``SpeciesSums`` (photo count and a running sum of its projected photos,
started from the last refinement) that an add or a removal updates in O(1);
the full refinement runs on ``refine`` (in the
background, or after an import). A trained bundle's visual prototype counts as
a prior worth ``n0`` photos; the fused prototype is Proto-CLIP's
``normalize(alpha * visual + (1 - alpha) * text)``. Formulas and the choice of
``n0``: docs/gallery.md ("Prototypes from photos").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from biolit_id.index.core.vectors import (  # the trainer's: same prototypes
    SEED_ITERATIONS,
    fuse_prototypes,
    l2_normalize64,
    weighted_prototype,
)

__all__ = ["PrototypeBuilder", "SpeciesSums", "combine_with_prior", "weighted_prototype"]

DEFAULT_PRIOR_WEIGHT = 10.0


def combine_with_prior(prior: np.ndarray | None, prior_weight: float,
                       estimate: np.ndarray, n: int) -> np.ndarray:
    """Count-weighted mean of a trained prototype and the photos' estimate (unit)."""
    if prior is None or prior_weight <= 0:
        return np.asarray(estimate, dtype=np.float32)
    mixed = prior_weight * l2_normalize64(prior) + n * l2_normalize64(estimate)
    return l2_normalize64(mixed).astype(np.float32)


@dataclass(frozen=True)
class SpeciesSums:
    """A species' visual-prototype state, updatable per photo in O(1).

    ``total`` is the sum of the species' projected unit photos, except that a
    refinement replaces it by the weighted prototype scaled to the length the
    plain sum had, so later photos count as much as before and, until the next
    change, the prototype is exactly the refined one. ``refined_count``: the
    photos the last refinement saw (how far the sums have drifted from it).
    """

    count: int
    total: np.ndarray  # float64 [P]
    refined_count: int = 0

    @classmethod
    def empty(cls, dim: int) -> SpeciesSums:
        return cls(0, np.zeros(dim, np.float64), 0)

    @classmethod
    def refined(cls, photos: np.ndarray, iterations: int = SEED_ITERATIONS) -> SpeciesSums:
        """Exact state from all the species' projected photos [n, P]."""
        photos = np.asarray(photos, np.float64)
        if not len(photos):
            return cls.empty(photos.shape[1])
        length = float(np.linalg.norm(l2_normalize64(photos).sum(axis=0)))
        total = l2_normalize64(weighted_prototype(photos, iterations)) * max(length, 1e-6)
        return cls(len(photos), total, len(photos))

    def plus(self, photos: np.ndarray, sign: int = 1) -> SpeciesSums:
        """The state with these projected photos [n, P] added (``sign=-1``: removed)."""
        photos = np.atleast_2d(np.asarray(photos, np.float64))
        return self.shifted(sign * l2_normalize64(photos).sum(axis=0), sign * len(photos))

    def shifted(self, total: np.ndarray, count: int) -> SpeciesSums:
        """The state with a summed change (``total`` of unit photos, ``count`` photos)."""
        n = self.count + int(count)
        if n <= 0:  # the last photo went: start again from nothing, not from rounding
            return SpeciesSums.empty(len(self.total))
        return SpeciesSums(n, self.total + np.asarray(total, np.float64), self.refined_count)

    def visual(self) -> np.ndarray | None:
        """The unit visual prototype, None without photos."""
        if self.count <= 0 or not np.any(self.total):
            return None
        return l2_normalize64(self.total).astype(np.float32)

    def drift(self) -> float:
        """Share of the photos added or removed since the last refinement (0: refined)."""
        return abs(self.count - self.refined_count) / max(self.count, 1)

    def to_bytes(self) -> bytes:
        return np.ascontiguousarray(self.total, dtype="<f8").tobytes()

    @classmethod
    def from_bytes(cls, count: int, data: bytes, refined_count: int) -> SpeciesSums:
        return cls(int(count), np.frombuffer(data, dtype="<f8").astype(np.float64),
                   int(refined_count))


@dataclass
class PrototypeBuilder:
    """Everything needed to compute one species' fused prototype in the scoring space.

    ``base_names``/``base_vectors``: the start-up PrototypeSet (bundle fused
    prototypes, or catalog text prototypes in zero-shot). ``visual_prior`` and
    ``text_base``: the bundle's visual and text prototypes, row-aligned with
    ``base_names`` (None without a bundle). ``text_for``: text prototypes in
    the scoring space for any catalog species (new species included).
    ``source``: what the fused prototypes are computed from ("bundle:<id>" or
    "zero-shot:<model>"). The space id only says where vectors live, and a
    recalibrated bundle keeps its space; a gallery that stores prototypes
    (Milvus) tags them with ``source`` so another bundle recomputes them.
    """

    base_names: tuple[str, ...]
    base_vectors: np.ndarray
    text_for: Callable[[list[str]], np.ndarray]
    alpha: float
    visual_prior: np.ndarray | None = None
    text_base: np.ndarray | None = None
    prior_weights: dict[str, float] | None = None
    source: str = ""
    iterations: int = SEED_ITERATIONS  # the visual-prototype recipe (0: the plain mean)

    def __post_init__(self) -> None:
        self._base_index = {n: i for i, n in enumerate(self.base_names)}

    def prior_weight(self, name: str) -> float:
        if self.prior_weights and name in self.prior_weights:
            return float(self.prior_weights[name])
        return DEFAULT_PRIOR_WEIGHT

    def without_photos(self, names: Sequence[str]) -> np.ndarray:
        """Prototypes of species with no photos: their base row, else their text."""
        out = np.zeros((len(names), self.base_vectors.shape[1]), dtype=np.float32)
        missing = [(i, n) for i, n in enumerate(names) if n not in self._base_index]
        for i, name in enumerate(names):
            row = self._base_index.get(name)
            if row is not None:
                out[i] = self.base_vectors[row]
        if missing:
            text = self.text_for([n for _, n in missing])
            for (i, _), vec in zip(missing, text, strict=True):
                out[i] = vec
        return out

    def fused(self, name: str, photos: np.ndarray) -> np.ndarray:
        """Fused prototype of ``name`` given all its photos in the scoring space [n, P]."""
        if not len(photos):
            return self.without_photos([name])[0]
        return self.fused_from_visual(name, weighted_prototype(photos, self.iterations),
                                      len(photos))

    def refined_sums(self, photos: np.ndarray) -> SpeciesSums:
        """A species' exact state from all its projected photos, by this recipe."""
        return SpeciesSums.refined(photos, self.iterations)

    def fused_from_sums(self, name: str, sums: SpeciesSums) -> np.ndarray:
        """Fused prototype of ``name`` from its running sums: O(1), no photo read."""
        visual = sums.visual()
        if visual is None:
            return self.without_photos([name])[0]
        return self.fused_from_visual(name, visual, sums.count)

    def fused_from_visual(self, name: str, visual: np.ndarray, n: int) -> np.ndarray:
        row = self._base_index.get(name)
        if row is not None and self.visual_prior is not None:
            visual = combine_with_prior(self.visual_prior[row], self.prior_weight(name),
                                        visual, n)
        if row is not None and self.text_base is not None:
            text = self.text_base[row]
        else:
            text = self.text_for([name])[0]
        return fuse_prototypes(visual[None, :], np.asarray(text)[None, :], self.alpha)[0]
