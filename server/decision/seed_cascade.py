"""``routing: seed``: the BioLit seed's cascade, bit-exact (docs/seed-v4.md, "Scoring").

An MLP head over the common species and fused prototypes over all of them,
then the seed's four rules in order. The head's classes map onto the live
prototype rows (``HeadMapping``), so species added at runtime keep their place.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.decision.bundle import Bundle
from biolit_id.server.decision.head import Head
from biolit_id.server.decision.rules import masked_softmax, route_hybrid, routed_distribution
from biolit_id.server.decision.types import GenericRankAnswers, NeighbourFn, Scores, Thresholds


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


class SeedCascadeScorer(GenericRankAnswers):
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
