"""``routing: fused``: one calibrated probability distribution over every species.

The seed's cascade asks the head first, so a rare species loses whenever the
head, which never saw it, is fairly sure of a common one. Here the head, the
prototypes and (for runtime species) their nearest photos are terms of one
log-linear model fitted on validation data. The model: docs/training.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from biolit_id.index.base import GalleryError, warn_degraded
from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.decision.bundle import Bundle
from biolit_id.server.decision.rules import masked_softmax, route_fused
from biolit_id.server.decision.seed_cascade import HeadMapping, build_head
from biolit_id.server.decision.types import (
    GenericRankAnswers,
    NeighbourFn,
    Scores,
    SpeciesGroup,
    Thresholds,
)

NEIGHBOURS = 3  # reference photos averaged per species in the kNN term
RUNTIME_PHOTOS = 20  # photos per species in the training-time simulation of AddExemplars


@dataclass(frozen=True)
class FusionWeights:
    """The log-linear model's weights (see the module docstring); fitted, never hand-set."""

    proto: float
    head: float
    prior: float
    novel_proto: float
    novel_knn: float
    novel_offset: float

    @classmethod
    def default(cls, temperature: float, head_classes: int) -> FusionWeights:
        """Before any fit: the prototypes at their temperature, the head as it is, and a
        species outside the head scored as a head class the head finds average."""
        return cls(proto=temperature, head=1.0, prior=0.0, novel_proto=temperature,
                   novel_knn=0.0, novel_offset=-float(np.log(max(head_classes, 1))))

    @classmethod
    def from_json(cls, data: dict) -> FusionWeights:
        return cls(**{k: float(data[k]) for k in cls.__dataclass_fields__})

    def to_json(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fused_logits(cos: np.ndarray, head_log_probs: np.ndarray, common_to_global: np.ndarray,
                 log_prior: np.ndarray, knn: np.ndarray | None, w: FusionWeights) -> np.ndarray:
    """[B, S] logits of the fused distribution (``tools/training/fusion.py`` fits these weights
    with the same formula in torch; a test keeps the two equal).

    ``knn`` [B, S] is NaN (or None) where a species has no reference photos: its
    prototype cosine stands in.
    """
    cos = np.asarray(cos, dtype=np.float64)
    near = cos if knn is None else np.where(np.isnan(knn), cos, knn)
    log_prior = np.asarray(log_prior, dtype=np.float64)
    # A new species counts as an average head species for the prior, so refitting the
    # prior weight (calibrate) moves both levels together.
    level = w.prior * float(log_prior.mean()) if len(log_prior) else 0.0
    z = w.novel_proto * cos + w.novel_knn * near + w.novel_offset + level
    if len(common_to_global):
        z[:, common_to_global] = (w.proto * cos[:, common_to_global]
                                  + w.head * np.asarray(head_log_probs, dtype=np.float64)
                                  + w.prior * log_prior[None, :])
    return z


def neighbour_similarity(queries: np.ndarray, exemplars: Sequence[np.ndarray],
                         k: int = NEIGHBOURS) -> np.ndarray:
    """[B, n] mean cosine of each query to the ``k`` nearest photos of each species
    (rows unit, in the prototype space); NaN for a species without photos."""
    queries = np.asarray(queries, dtype=np.float64)
    out = np.full((len(queries), len(exemplars)), np.nan)
    for j, photos in enumerate(exemplars):
        if len(photos):
            sims = queries @ np.asarray(photos, dtype=np.float64).T
            top = -np.sort(-sims, axis=1)[:, :k]
            out[:, j] = top.mean(axis=1)
    return out


def gallery_neighbours(gallery, k: int = NEIGHBOURS, extra: int = 64) -> NeighbourFn:
    """The kNN term from a live gallery (``search(embeddings, k, species=...)``).

    One search over the asked species' photos; a species none of whose photos
    is among the hits keeps NaN (its prototype stands in), which only happens
    to species far from the query.
    """

    def neighbours(embeddings: np.ndarray, names: Sequence[str]) -> np.ndarray:
        out = np.full((len(embeddings), len(names)), np.nan)
        if not len(names):
            return out
        column = {n: j for j, n in enumerate(names)}
        try:
            hits = gallery.search(embeddings, k * len(names) + extra, species=list(names))
        except GalleryError as exc:  # backend away (Milvus stopped): prototypes stand in
            warn_degraded(exc)
            return out
        for i, row in enumerate(hits):
            seen: dict[str, list[float]] = {}
            for hit in row:  # best first
                best = seen.setdefault(hit.species, [])
                if len(best) < k:
                    best.append(float(hit.score))
            for name, scores in seen.items():
                if name in column:
                    out[i, column[name]] = float(np.mean(scores))
        return out

    return neighbours


class FusedScorer(GenericRankAnswers):
    """``routing: fused`` (the default of bundles ``biolit-id train`` writes)."""

    mode = "fused"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.thresholds = bundle.thresholds
        self.temperature = bundle.temperature  # the prototype-only softmax (candidates)
        self.alpha = bundle.alpha
        self.head = build_head(bundle)
        fusion = bundle.fusion or {}
        self.weights = (FusionWeights.from_json(fusion["weights"]) if "weights" in fusion
                        else FusionWeights.default(bundle.temperature, len(bundle.common)))
        prior = fusion.get("head_log_prior")
        self.log_prior = (np.asarray(prior, dtype=np.float64) if prior is not None
                          else np.zeros(len(bundle.common)))
        if len(self.log_prior) != len(bundle.common):
            raise ValueError(f"fusion.head_log_prior has {len(self.log_prior)} values for "
                             f"{len(bundle.common)} head classes")
        self._common_to_global = HeadMapping(bundle)
        groups = bundle.extra.get("groups") or {}
        self._common = set(groups.get("common") or bundle.species)
        self._trained = set(bundle.species)
        self._groups_cache: tuple[tuple[str, ...], np.ndarray] | None = None

    def species_groups(self, names: tuple[str, ...]) -> np.ndarray:
        """[S] ``SpeciesGroup`` of each live species: trained common, trained rare, or
        added at runtime (cached on the immutable names tuple)."""
        cached = self._groups_cache
        if cached is not None and cached[0] is names:
            return cached[1]
        groups = np.array([SpeciesGroup.RUNTIME if n not in self._trained else
                           SpeciesGroup.COMMON if n in self._common else SpeciesGroup.RARE
                           for n in names], dtype=np.int64)
        self._groups_cache = (names, groups)
        return groups

    def to_prototype_space(self, embeddings: np.ndarray) -> np.ndarray:
        return self.bundle.whiten(embeddings)

    def with_weights(self, weights: FusionWeights) -> FusedScorer:
        """A copy scoring with other weights (calibration refits them)."""
        other = object.__new__(FusedScorer)
        other.__dict__.update(self.__dict__)
        other.weights = weights
        return other

    def components(self, embeddings: np.ndarray, protos: PrototypeSet,
                   neighbours: NeighbourFn | None = None,
                   allowed: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(cos [B, S], head logits [B, C], head -> row [C], knn [B, S] or None)."""
        c2g = self._common_to_global(protos)
        cos = self.to_prototype_space(embeddings).astype(np.float64) @ protos.vectors.T.astype(
            np.float64)
        logits = (self.head.logits(embeddings) if self.head is not None
                  else np.zeros((len(embeddings), 0)))
        knn = None
        if neighbours is not None:
            outside = np.ones(len(protos.names), dtype=bool)
            outside[c2g] = False
            if allowed is not None:
                outside &= allowed
            rows = np.flatnonzero(outside)
            if len(rows):
                knn = np.full(cos.shape, np.nan)
                knn[:, rows] = neighbours(embeddings, [protos.names[r] for r in rows])
        return cos, logits, c2g, knn

    def score(self, embeddings: np.ndarray, protos: PrototypeSet,
              allowed: np.ndarray | None = None,
              neighbours: NeighbourFn | None = None) -> Scores:
        cos, logits, c2g, knn = self.components(embeddings, protos, neighbours, allowed)
        return self.from_components(cos, logits, c2g, knn, allowed,
                                    self.species_groups(protos.names))

    def from_components(self, cos: np.ndarray, logits: np.ndarray, c2g: np.ndarray,
                        knn: np.ndarray | None, allowed: np.ndarray | None = None,
                        species_group: np.ndarray | None = None) -> Scores:
        z = fused_logits(cos, log_softmax(logits) if logits.shape[1] else logits, c2g,
                         self.log_prior, knn, self.weights)
        distribution = masked_softmax(z, allowed)
        allowed_common = None if allowed is None else allowed[c2g]
        p_common = (masked_softmax(logits, allowed_common) if logits.shape[1]
                    else np.zeros((len(cos), 0)))
        return Scores(
            p_common=p_common,
            p_proto=masked_softmax(self.temperature * cos, allowed),
            common_to_global=c2g,
            routed=route_fused(distribution, self.thresholds, species_group),
            distribution=distribution,
            species_group=species_group,
        )

    def decide(self, scores: Scores, thresholds: Thresholds) -> Scores:
        return replace(scores, routed=route_fused(scores.distribution, thresholds,
                                                  scores.species_group))
