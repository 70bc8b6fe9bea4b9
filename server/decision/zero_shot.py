"""No bundle: cosine to each species' text prototype, CLIP's logit scale, one cut."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.decision.bundle import Bundle
from biolit_id.server.decision.rules import masked_softmax, route_zero_shot
from biolit_id.server.decision.types import (
    ZERO_SHOT_LOGIT_SCALE,
    GenericRankAnswers,
    NeighbourFn,
    Scores,
    Thresholds,
)

ZERO_SHOT_ALPHA = 0.8
"""The seed's alpha. Zero-shot has no trained visual prototypes: the gallery uses it
to fuse the visual prototypes of species that got reference photos,
``normalize(alpha * visual + (1 - alpha) * text)``, as a bundle uses its own alpha."""


class ZeroShotScorer(GenericRankAnswers):
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
