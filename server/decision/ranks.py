"""Answers above species level: probability mass per taxon, and the fallback rule.

An unsure species is often a sure genus: the decision's own distribution is
summed per taxon and the finest rank over its calibrated threshold answers,
so a rank answer always agrees with the species mass under it. Group names
(``Patella sp.``) stay species-level answers. Rules: docs/taxonomy.md.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from biolit_id.server.catalog.catalog import FALLBACK_RANKS, Catalog, SpeciesRecord
from biolit_id.server.decision.types import RankAnswer

SPECIES_LEVEL_RANKS = frozenset({"species", "subspecies", "species_group"})


def taxon_of(record: SpeciesRecord | None, rank: str) -> str:
    """The taxon a species (or species group) belongs to at ``rank``, "" when none.

    A catalog entry like genus "Magallana / Ostrea" names no single taxon: a
    group across genera belongs to no genus.
    """
    if record is None:
        return ""
    name = record.taxon_at(rank)
    return "" if "/" in name and rank != "species" else name


def answer_rank(record: SpeciesRecord | None) -> str:
    """The rank a species-level answer is reported at.

    A class named for an undetermined species of a genus (``Patella sp.``,
    catalog rank "genus") is a group of species photographers cannot tell
    apart; its genus is an answer of its own, made from the genus mass.
    """
    if record is None:
        return "species"
    return record.rank if record.rank in SPECIES_LEVEL_RANKS else "species_group"


def taxon_masses(distribution: np.ndarray, names: Sequence[str], catalog: Catalog,
                 rank: str) -> dict[str, float]:
    """Sum of species probabilities per taxon at ``rank`` (one distribution)."""
    masses: dict[str, float] = defaultdict(float)
    for name, p in zip(names, distribution, strict=True):
        taxon = taxon_of(catalog.get(name), rank)
        if taxon and p > 0:
            masses[taxon] += float(p)
    return masses


def rank_confidences(dist: np.ndarray, names: Sequence[str], catalog: Catalog,
                     ranks: Sequence[str] = FALLBACK_RANKS) -> list[RankAnswer]:
    """Best and second-best taxon with their mass, per rank, for one species distribution."""
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


def taxon_contains(rank: str, taxon: str, species: str, catalog: Catalog) -> bool:
    """Whether the answered taxon contains the true species (a rank answer is right)."""
    return bool(taxon) and taxon_of(catalog.get(species), rank) == taxon
