"""Scores for a batch of embeddings: the components, the decision and its distribution.

The seed's scoring (docs/seed-v4.md, "Scoring") and the zero-shot text
softmax. Every scorer also returns the one species distribution its decision
stands on, so rank answers sum that and not another. ``allowed`` gives
excluded species -inf logits, so each softmax renormalises over the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from biolit_id.core.types import PrototypeSet
from biolit_id.server.bundle import Bundle
from biolit_id.server.head import Head
from biolit_id.server.routing import (
    ZERO_SHOT_LOGIT_SCALE,
    Routed,
    Thresholds,
    route_hybrid,
    route_zero_shot,
    routed_distribution,
)

ZERO_SHOT_ALPHA = 0.8
"""The seed's alpha. Zero-shot has no trained visual prototypes: the gallery uses it
to fuse the visual prototypes of species that got reference photos,
``normalize(alpha * visual + (1 - alpha) * text)``, as a bundle uses its own alpha."""

# (queries in the prototype space [B, P], species names) -> [B, n] similarity of each
# query to that species' nearest reference photos, NaN where it has none (server.fused).
NeighbourFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class Scores:
    p_common: np.ndarray  # [B, C] over the head's classes (C = 0 without a head)
    p_proto: np.ndarray  # [B, S] over PrototypeSet.names
    common_to_global: np.ndarray  # [C] head class -> row of PrototypeSet
    routed: Routed
    distribution: np.ndarray  # [B, S] the decision's species distribution


class Scorer(Protocol):
    """What the pipeline, the gallery and the tools need of a decision rule."""

    mode: str
    bundle: Bundle | None
    thresholds: Thresholds
    temperature: float
    alpha: float

    def to_prototype_space(self, embeddings: np.ndarray) -> np.ndarray: ...

    def score(self, embeddings: np.ndarray, protos: PrototypeSet,
              allowed: np.ndarray | None = None,
              neighbours: NeighbourFn | None = None) -> Scores: ...

    def decide(self, scores: Scores, thresholds: Thresholds) -> Scores:
        """The same scores decided under other thresholds (calibration searches with it)."""
        ...


def masked_softmax(logits: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if allowed is not None:
        logits = np.where(allowed[None, :], logits, -np.inf)
        if not allowed.any():
            return np.zeros_like(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class ZeroShotScorer:
    """Cosine to text prototypes, CLIP logit scale, reject below a threshold."""

    mode = "zero-shot"

    def __init__(self, thresholds: Thresholds | None = None,
                 logit_scale: float = ZERO_SHOT_LOGIT_SCALE) -> None:
        self.thresholds = thresholds or Thresholds()
        self.logit_scale = logit_scale
        self.temperature = logit_scale
        self.alpha = ZERO_SHOT_ALPHA  # used by the gallery for species with photos
        self.bundle: Bundle | None = None

    def to_prototype_space(self, embeddings: np.ndarray) -> np.ndarray:
        return np.asarray(embeddings, dtype=np.float32)

    def score(self, embeddings: np.ndarray, protos: PrototypeSet,
              allowed: np.ndarray | None = None,
              neighbours: NeighbourFn | None = None) -> Scores:
        sims = self.to_prototype_space(embeddings) @ protos.vectors.T
        p_proto = masked_softmax(self.logit_scale * sims, allowed)
        routed = route_zero_shot(p_proto, self.thresholds)
        return Scores(
            p_common=np.zeros((len(p_proto), 0)),
            p_proto=p_proto,
            common_to_global=np.zeros(0, dtype=np.int64),
            routed=routed,
            distribution=p_proto,
        )

    def decide(self, scores: Scores, thresholds: Thresholds) -> Scores:
        return replace(scores, routed=route_zero_shot(scores.p_proto, thresholds))


class HeadMapping:
    """Head class -> live prototype row, cached on the (immutable) names tuple."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self._cache: tuple[tuple[str, ...], np.ndarray] | None = None

    def __call__(self, protos: PrototypeSet) -> np.ndarray:
        cached = self._cache
        if cached is not None and cached[0] is protos.names:
            return cached[1]
        mapping = self.bundle.common_to_global(protos.names)
        self._cache = (protos.names, mapping)
        return mapping


def build_head(bundle: Bundle) -> Head | None:
    if not bundle.common:
        return None
    return Head(bundle.head_state, bundle.embedding_dim, len(bundle.common), bundle.head_config)


class HybridScorer:
    """``routing: seed``: MLP head for common species, fused prototypes for all, the cascade."""

    mode = "hybrid"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.thresholds = bundle.thresholds
        self.temperature = bundle.temperature
        self.alpha = bundle.alpha
        self.head = build_head(bundle)
        self._common_to_global = HeadMapping(bundle)

    def to_prototype_space(self, embeddings: np.ndarray) -> np.ndarray:
        return self.bundle.whiten(embeddings)

    def score(self, embeddings: np.ndarray, protos: PrototypeSet,
              allowed: np.ndarray | None = None,
              neighbours: NeighbourFn | None = None) -> Scores:
        c2g = self._common_to_global(protos)
        if self.head is not None:
            allowed_common = None if allowed is None else allowed[c2g]
            p_common = masked_softmax(self.head.logits(embeddings), allowed_common)
        else:
            p_common = np.zeros((len(embeddings), 0))
        sims = self.to_prototype_space(embeddings).astype(np.float64) @ protos.vectors.T.astype(
            np.float64
        )
        p_proto = masked_softmax(self.temperature * sims, allowed)
        routed = route_hybrid(p_common, p_proto, c2g, self.thresholds)
        return Scores(p_common=p_common, p_proto=p_proto, common_to_global=c2g, routed=routed,
                      distribution=routed_distribution(routed.method, p_common, p_proto, c2g))

    def decide(self, scores: Scores, thresholds: Thresholds) -> Scores:
        routed = route_hybrid(scores.p_common, scores.p_proto, scores.common_to_global,
                              thresholds)
        return replace(scores, routed=routed, distribution=routed_distribution(
            routed.method, scores.p_common, scores.p_proto, scores.common_to_global))
