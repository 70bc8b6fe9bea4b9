"""Answers above species level: probability mass per taxon, and the fallback rule.

When the species is rejected the photo is often certainly *a limpet*: the
routing-consistent species distribution (REFERENCE.md, "Taxonomic
confidence") is summed per taxon at genus, family, order and class, and the
finest rank whose mass passes its own calibrated threshold answers (the
common-ancestor rule iNaturalist uses). Thresholds come from ``biolit-id
calibrate``; without them there is no fallback, only an honest rejection.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from biolit_id.server.catalog import FALLBACK_RANKS, Catalog
from biolit_id.server.routing import routed_distribution


@dataclass(frozen=True)
class RankAnswer:
    rank: str
    taxon: str
    confidence: float
    runner_up: str = ""
    runner_up_confidence: float = 0.0


def taxon_masses(distribution: np.ndarray, names: Sequence[str], catalog: Catalog,
                 rank: str) -> dict[str, float]:
    """Sum of species probabilities per taxon at ``rank`` (one distribution)."""
    masses: dict[str, float] = defaultdict(float)
    for name, p in zip(names, distribution, strict=True):
        record = catalog.get(name)
        taxon = record.taxon_at(rank) if record else ""
        if taxon and p > 0:
            masses[taxon] += float(p)
    return masses


def rank_confidences(scores, names: Sequence[str], catalog: Catalog,
                     ranks: Sequence[str] = FALLBACK_RANKS) -> list[RankAnswer]:
    """Best and second-best taxon with their mass, per rank, for a single row."""
    dist = routed_distribution(
        scores.routed.method, scores.p_common, scores.p_proto, scores.common_to_global
    )[0]
    answers = []
    for rank in ranks:
        ranked = sorted(taxon_masses(dist, names, catalog, rank).items(), key=lambda kv: -kv[1])
        if not ranked:
            continue
        second = ranked[1] if len(ranked) > 1 else ("", 0.0)
        answers.append(RankAnswer(rank, ranked[0][0], min(1.0, ranked[0][1]), *second))
    return answers


def taxon_fallback(answers: Sequence[RankAnswer], bundle) -> RankAnswer | None:
    """The finest rank whose mass passes its calibrated threshold, if any."""
    thresholds = getattr(bundle, "taxon_thresholds", None) or {}
    by_rank = {a.rank: a for a in answers}
    for rank in FALLBACK_RANKS:
        answer = by_rank.get(rank)
        threshold = thresholds.get(rank)
        if answer is not None and threshold is not None and answer.confidence >= threshold:
            return answer
    return None
