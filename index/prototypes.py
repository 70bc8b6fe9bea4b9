"""Per-species prototypes from reference photos, without retraining anything.

Visual prototype (the seed's "similarity-weighted prototypes", arXiv:2110.11553):
a plain mean lets one odd photo (wrong crop, another animal in frame) drag
the prototype away from the species. ``biolit_id.core.vectors.weighted_prototype``
(the very function ``biolit-id train`` uses, so runtime and trained
prototypes are built alike) refines the mean: each photo is weighted by
``softmax(sharpness * cos(photo, prototype))`` and the prototype re-estimated,
twice. An outlier at cosine distance 0.3 from the rest gets ~exp(-3) = 5 %
of a typical weight. With one photo it is that photo; the result is
deterministic (inputs in id order), so a restart recomputes identical vectors.

Combining with a trained bundle prototype: the bundle's visual prototype was
estimated from training photos we do not have, so it acts as a prior worth
``n0`` photos: ``normalize(n0 * bundle_visual + n * refined_mean)``. ``n0`` is
the species' training support when the bundle records it (manifest key
``train_counts``, written by ``biolit-id train``, or ``prototype_support``:
{species: count}); otherwise ``DEFAULT_PRIOR_WEIGHT``
= 10, the smallest per-species photo count the seed trained its rare-species
prototypes from ("10-50 images"), so that a couple of curator photos nudge a
trained prototype while a dozen or more take over.

Fused prototype (Proto-CLIP, arXiv:2307.03073): ``normalize(alpha * visual +
(1 - alpha) * text)`` with the scorer's alpha: the bundle's, or
the server's zero-shot alpha = 0.8 (the seed's value) without a bundle.
A species without photos keeps its base prototype: the bundle's fused one, or
its text prototype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from biolit_id.core.vectors import (  # the trainer's: same prototypes
    fuse_prototypes,
    l2_normalize64,
    weighted_prototype,
)

__all__ = ["PrototypeBuilder", "combine_with_prior", "weighted_prototype"]

DEFAULT_PRIOR_WEIGHT = 10.0


def combine_with_prior(prior: np.ndarray | None, prior_weight: float,
                       estimate: np.ndarray, n: int) -> np.ndarray:
    """Count-weighted mean of a trained prototype and the photos' estimate (unit)."""
    if prior is None or prior_weight <= 0:
        return np.asarray(estimate, dtype=np.float32)
    mixed = prior_weight * l2_normalize64(prior) + n * l2_normalize64(estimate)
    return l2_normalize64(mixed).astype(np.float32)


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
        """Fused prototype of ``name`` given its photos in the scoring space [n, P]."""
        if not len(photos):
            return self.without_photos([name])[0]
        visual = weighted_prototype(photos)
        row = self._base_index.get(name)
        if row is not None and self.visual_prior is not None:
            visual = combine_with_prior(self.visual_prior[row], self.prior_weight(name),
                                        visual, len(photos))
        if row is not None and self.text_base is not None:
            text = self.text_base[row]
        else:
            text = self.text_for([name])[0]
        return fuse_prototypes(visual[None, :], np.asarray(text)[None, :], self.alpha)[0]
