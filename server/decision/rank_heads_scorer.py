"""Trained per-rank heads beside a bundle's own decision, never against it.

A bundle that ``biolit-id train --rank-heads`` gave rank heads keeps its
decision rule (``routing: fused`` or ``seed``); the heads only speak at ranks
above the species, and only in agreement with that rule's own species
distribution (the seed v2 did not check this, §6, and its answers at order,
class and phylum were mostly wrong):

* ``rank_confidences``: per rank with a head, the product of the two
  opinions, ``q(t) ∝ sqrt(p_head(t) * m(t))`` where ``m(t)`` is the species
  mass under taxon ``t``. A taxon without species mass gets ``q = 0``: no
  taxon is ever reported that the species distribution does not support.
* a rank answer (species not answered) is given at the finest rank whose
  mass-based answer passes its calibrated threshold (``server.decision.ranks``)
  *and* is the head's own top-1; otherwise the next coarser rank is tried.
  The confidence stays the calibrated mass, so ``calibrate``'s thresholds
  keep their meaning; the heads can only withhold an answer, never invent one.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.catalog.catalog import FALLBACK_RANKS, Catalog
from biolit_id.server.decision.bundle import BundleError
from biolit_id.server.decision.rank_heads import RankHeadError, RankHeads
from biolit_id.server.decision.ranks import taxon_masses
from biolit_id.server.decision.types import (
    Identification,
    Method,
    NeighbourFn,
    RankAnswer,
    Scorer,
    Scores,
    Thresholds,
)


def agreed_distribution(head_probs: np.ndarray, labels: tuple[str, ...],
                        masses: Mapping[str, float]) -> dict[str, float]:
    """``q(t) ∝ sqrt(p_head(t) * m(t))`` over the taxa both know, normalised."""
    raw = {t: float(np.sqrt(p * masses.get(t, 0.0))) for t, p in zip(labels, head_probs,
                                                                      strict=True)}
    total = sum(raw.values())
    return {t: v / total for t, v in raw.items() if v > 0} if total > 0 else {}


def _ranked(dist: Mapping[str, float]) -> list[tuple[str, float]]:
    return sorted(dist.items(), key=lambda kv: (-kv[1], kv[0]))


class RankHeadsScorer:
    """Wraps a bundle's scorer: its scores and decisions, with rank answers the heads agree to."""

    owns_rank_answers = False

    def __init__(self, inner: Scorer, heads: RankHeads) -> None:
        self.inner = inner
        self.heads = heads
        self.mode, self.bundle = inner.mode, inner.bundle
        self.thresholds, self.temperature, self.alpha = (inner.thresholds, inner.temperature,
                                                         inner.alpha)

    def to_prototype_space(self, embeddings: np.ndarray) -> np.ndarray:
        return self.inner.to_prototype_space(embeddings)

    def score(self, embeddings: np.ndarray, protos: PrototypeSet,
              allowed: np.ndarray | None = None,
              neighbours: NeighbourFn | None = None) -> Scores:
        return self.inner.score(embeddings, protos, allowed, neighbours)

    def decide(self, scores: Scores, thresholds: Thresholds) -> Scores:
        return self.inner.decide(scores, thresholds)

    def head_probabilities(self, embedding: np.ndarray) -> dict[str, np.ndarray]:
        fw = self.inner.to_prototype_space(embedding)
        return {r: p[0] for r, p in self.heads.probabilities(fw).items()}

    def explain(self, result: Identification, scores, protos: PrototypeSet, catalog: Catalog,
                embedding: np.ndarray) -> Identification:
        probs = self.head_probabilities(embedding)
        dist = scores.distribution[0]
        by_rank = {a.rank: a for a in result.rank_confidences}
        agreed: dict[str, RankAnswer] = {}
        for rank in self.heads.ranks:
            masses = taxon_masses(dist, protos.names, catalog, rank)
            ranked = _ranked(agreed_distribution(probs[rank], self.heads.heads[rank].labels,
                                                 masses))
            if ranked:
                second = ranked[1] if len(ranked) > 1 else ("", 0.0)
                agreed[rank] = RankAnswer(rank, ranked[0][0], ranked[0][1], *second)
        head_top = {r: self.heads.heads[r].labels[int(np.argmax(p))] for r, p in probs.items()}
        result.rank_confidences = [agreed.get(a.rank, a) for a in result.rank_confidences] + [
            a for r, a in agreed.items() if r not in by_rank]
        if result.species:
            return result
        answer = self._agreeing_fallback(by_rank, head_top)
        if answer is None:
            if result.method == Method.TAXON:  # the mass alone answered; the head disagrees
                result.method, result.rank, result.taxon, result.record = (
                    Method.REJECTED, "", "", None)
            return result
        result.method, result.rank, result.taxon = Method.TAXON, answer.rank, answer.taxon
        result.confidence = answer.confidence
        result.record = catalog.first_under(answer.rank, answer.taxon)
        return result

    def _agreeing_fallback(self, by_rank: Mapping[str, RankAnswer],
                           head_top: Mapping[str, str]) -> RankAnswer | None:
        thresholds = getattr(self.inner.bundle, "taxon_thresholds", None) or {}
        for rank in FALLBACK_RANKS:
            answer, threshold = by_rank.get(rank), thresholds.get(rank)
            if answer is None or threshold is None or answer.confidence < threshold:
                continue
            if rank in head_top and head_top[rank] != answer.taxon:
                continue  # the rank's head says otherwise: no answer at this rank
            return answer
        return None


def with_rank_heads(scorer: Scorer) -> Scorer:
    """The scorer, wrapped when its bundle carries trained rank heads."""
    bundle = scorer.bundle
    if bundle is None or scorer.owns_rank_answers:  # zero-shot, or a rule of its own (v2)
        return scorer
    try:
        heads = RankHeads.from_bundle(bundle)
    except RankHeadError as exc:  # refused at start, like any inconsistent bundle
        raise BundleError(f"bundle {bundle.bundle_id}: {exc}") from exc
    return scorer if heads is None or not heads.heads else RankHeadsScorer(scorer, heads)
