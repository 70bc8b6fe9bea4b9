"""``routing: seed-v2``: the BioLit seed's second-generation decision, exactly.

docs/seed-v2.md ("The decision, in our words"): Proto-CLIP over the species
(``softmax(T * cos)`` on the whitened 256-d features); the species is answered
when its probability ``p1 >= threshold`` and ``p1 - p2 >= margin``. Otherwise
the per-rank heads are walked family -> order -> class -> phylum -> kingdom
and the first whose top-1 passes the same two tests answers at that rank;
if none does, the photo is rejected with confidence 0. The reported margin is
always the species one (the prototype candidates' top-2 carry it). No head is
checked against the species answer or against the others: that is the seed's
rule, kept as it is (its coarse heads were trained misaligned, §3).

Seed levels -> service ranks: species_name -> species, famille -> family,
ordre -> order, classe -> class, phylum -> phylum, regne -> kingdom.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.catalog.catalog import LINEAGE_RANKS, Catalog, SpeciesRecord
from biolit_id.server.decision.bundle import Bundle, BundleError
from biolit_id.server.decision.rank_heads import RankHeadError, RankHeads
from biolit_id.server.decision.rules import masked_softmax
from biolit_id.server.decision.types import (
    Identification,
    Method,
    NeighbourFn,
    RankAnswer,
    Routed,
    Scores,
    Thresholds,
)

ROUTING = "seed-v2"
MANIFEST_KEY = "seed_v2"
# The seed v2 config (docs/seed-v2.md); the later production copy: 0.35 / 0.05.
DEFAULT_THRESHOLD = 0.5
DEFAULT_MARGIN = 0.10
PRODUCTION_THRESHOLD = 0.35
PRODUCTION_MARGIN = 0.05
# The seed's level names -> catalog ranks, and its walk order after the species (§6).
LEVEL_TO_RANK: dict[str, str] = {
    "species_name": "species",
    "famille": "family",
    "ordre": "order",
    "classe": "class",
    "phylum": "phylum",
    "regne": "kingdom",
}
RANK_TO_LEVEL = {rank: level for level, rank in LEVEL_TO_RANK.items()}
WALK: tuple[str, ...] = ("family", "order", "class", "phylum", "kingdom")


@dataclass(frozen=True)
class SeedV2Settings:
    """The decision's parameters and the seed's own names, from the bundle manifest."""

    threshold: float = DEFAULT_THRESHOLD
    margin: float = DEFAULT_MARGIN
    walk: tuple[str, ...] = WALK
    # bundle species (proper form) -> the seed's spelling (lower case), for its CSV
    seed_names: Mapping[str, str] = field(default_factory=dict)
    # bundle species -> rank -> taxon, the seed's tax_lookup (its insertion order kept)
    taxonomy: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def to_manifest(self) -> dict:
        return {"threshold": self.threshold, "margin": self.margin, "walk": list(self.walk),
                "seed_names": dict(self.seed_names),
                "taxonomy": {k: dict(v) for k, v in self.taxonomy.items()}}

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> SeedV2Settings:
        section = (bundle.extra or {}).get(MANIFEST_KEY)
        if not section:
            raise BundleError(f"bundle {bundle.bundle_id}: routing {ROUTING} needs a "
                              f"{MANIFEST_KEY!r} section (write it with import-seed --v2)")
        return cls(threshold=float(section["threshold"]), margin=float(section["margin"]),
                   walk=tuple(section.get("walk", WALK)),
                   seed_names=dict(section.get("seed_names", {})),
                   taxonomy={k: dict(v) for k, v in section.get("taxonomy", {}).items()})

    def seed_name(self, name: str) -> str:
        """How the seed spells a species (its CSV uses these)."""
        return self.seed_names.get(name, name)


@dataclass(frozen=True, kw_only=True)
class SeedV2Scores(Scores):
    rank_probs: dict[str, np.ndarray]  # rank -> [B, C] head probabilities
    rank_labels: dict[str, tuple[str, ...]]
    names: tuple[str, ...]  # the prototype set's species, p_proto's columns
    rank: np.ndarray  # [B] "species", a head's rank, or "" when rejected
    taxon: np.ndarray  # [B] the answered name ("" when rejected)


def _top2(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(argmax, top-1, top-2) per row; numpy's reversed argsort order, as the seed ranks."""
    order = np.argsort(p, axis=1)[:, ::-1]
    rows = np.arange(len(p))
    first = p[rows, order[:, 0]]
    second = p[rows, order[:, 1]] if p.shape[1] > 1 else np.zeros(len(p))
    return order[:, 0], first, second


def decide(p_proto: np.ndarray, rank_probs: Mapping[str, np.ndarray],
           rank_labels: Mapping[str, Sequence[str]], names: Sequence[str],
           threshold: float, margin: float, walk: Sequence[str] = WALK
           ) -> tuple[Routed, np.ndarray, np.ndarray]:
    """The seed v2 decision (docs/seed-v2.md), batched: (routed, rank per row, name per row)."""
    p_proto = np.asarray(p_proto, dtype=np.float64)
    n = len(p_proto)
    method = np.full(n, int(Method.REJECTED))
    species = np.full(n, -1)
    confidence = np.zeros(n)
    rank = np.full(n, "", dtype=object)
    taxon = np.full(n, "", dtype=object)
    if p_proto.shape[1]:
        idx, p1, p2 = _top2(p_proto)
        ok = (p1 >= threshold) & (p1 - p2 >= margin) & (p1 > 0)
        method[ok], species[ok], confidence[ok] = int(Method.PROTOTYPE), idx[ok], p1[ok]
        rank[ok] = "species"
        taxon[ok] = [names[i] for i in idx[ok]]
    open_rows = method == int(Method.REJECTED)
    for level in walk:
        probs = rank_probs.get(level)
        if probs is None or not open_rows.any():
            continue
        idx, q1, q2 = _top2(np.asarray(probs, dtype=np.float64))
        ok = open_rows & (q1 >= threshold) & (q1 - q2 >= margin) & (q1 > 0)
        method[ok], confidence[ok], rank[ok] = int(Method.TAXON), q1[ok], level
        taxon[ok] = [rank_labels[level][i] for i in idx[ok]]
        open_rows &= ~ok
    return Routed(method=method, species=species, confidence=confidence), rank, taxon


def allowed_labels(heads: RankHeads, taxonomy: Mapping[str, Mapping[str, str]],
                   names: Sequence[str], allowed: np.ndarray | None
                   ) -> dict[str, np.ndarray] | None:
    """Per rank, the labels some allowed species lies under (restrict_to never leaks)."""
    if allowed is None:
        return None
    out = {}
    for rank in heads.ranks:
        wanted = {taxonomy.get(n, {}).get(rank) for n, ok in zip(names, allowed, strict=True)
                  if ok}
        out[rank] = np.array([label in wanted for label in heads.heads[rank].labels])
    return out


class SeedV2Scorer:
    """Scorer for ``routing: seed-v2`` bundles (``server.decision.registry.ROUTINGS``)."""

    mode = ROUTING
    owns_rank_answers = True

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.settings = SeedV2Settings.from_bundle(bundle)
        try:
            heads = RankHeads.from_bundle(bundle)
        except RankHeadError as exc:
            raise BundleError(f"bundle {bundle.bundle_id}: {exc}") from exc
        if heads is None or not heads.heads:
            raise BundleError(f"bundle {bundle.bundle_id}: routing {ROUTING} needs rank heads")
        self.heads = heads
        self.thresholds = bundle.thresholds
        self.temperature = bundle.temperature
        self.alpha = bundle.alpha

    def to_prototype_space(self, embeddings: np.ndarray) -> np.ndarray:
        return self.bundle.whiten(embeddings)

    def score(self, embeddings: np.ndarray, protos: PrototypeSet,
              allowed: np.ndarray | None = None,
              neighbours: NeighbourFn | None = None) -> SeedV2Scores:
        fw = self.to_prototype_space(embeddings)
        sims = fw.astype(np.float64) @ protos.vectors.T.astype(np.float64)
        p_proto = masked_softmax(self.temperature * sims, allowed)
        label_mask = allowed_labels(self.heads, self.settings.taxonomy, protos.names, allowed)
        rank_probs = self.heads.probabilities(fw, label_mask)
        labels = {r: h.labels for r, h in self.heads.heads.items()}
        return self._decided(p_proto, rank_probs, labels, protos.names,
                             self.settings.threshold, self.settings.margin)

    def decide(self, scores: Scores, thresholds: Thresholds) -> SeedV2Scores:
        """Re-decided with ``thresholds.prototype`` as the threshold (the margin is kept)."""
        assert isinstance(scores, SeedV2Scores)
        return self._decided(scores.p_proto, scores.rank_probs, scores.rank_labels,
                             scores.names, thresholds.prototype, self.settings.margin)

    def _decided(self, p_proto, rank_probs, labels, names, threshold, margin) -> SeedV2Scores:
        routed, rank, taxon = decide(p_proto, rank_probs, labels, names, threshold, margin,
                                     self.settings.walk)
        return SeedV2Scores(p_common=np.zeros((len(p_proto), 0)), p_proto=p_proto,
                            common_to_global=np.zeros(0, dtype=np.int64), routed=routed,
                            distribution=p_proto, rank_probs=rank_probs, rank_labels=labels,
                            names=tuple(names), rank=rank, taxon=taxon)

    # ------------------------------------------------------------ explaining

    def rank_answers(self, scores: SeedV2Scores, row: int) -> list[RankAnswer]:
        """Each head's top-1 and runner-up, coarsest rank first."""
        answers = []
        for rank in self.heads.ranks:
            p = scores.rank_probs[rank][row]
            order = np.argsort(p)[::-1]
            second = order[1] if len(order) > 1 else None
            answers.append(RankAnswer(
                rank, scores.rank_labels[rank][order[0]], float(p[order[0]]),
                scores.rank_labels[rank][second] if second is not None else "",
                float(p[second]) if second is not None else 0.0))
        return answers

    def taxon_record(self, rank: str, taxon: str) -> SpeciesRecord:
        """The answered taxon with the lineage the seed gives it: the ranks above it of the
        first tax_lookup species carrying that label (classifier_infer_v2's rule)."""
        for lineage in self.settings.taxonomy.values():
            if lineage.get(rank) == taxon:
                stop = LINEAGE_RANKS.index(rank)
                taxonomy = {r: lineage[r] for r in LINEAGE_RANKS[:stop] if lineage.get(r)}
                return SpeciesRecord(taxon, rank=rank, taxonomy={**taxonomy, rank: taxon})
        return SpeciesRecord(taxon, rank=rank, taxonomy={rank: taxon})

    def explain(self, result: Identification, scores: Scores, protos: PrototypeSet,
                catalog: Catalog, embedding: np.ndarray) -> Identification:
        """The pipeline's answer made the seed's: its rank answers, its confidences."""
        assert isinstance(scores, SeedV2Scores)
        rank, taxon = str(scores.rank[0]), str(scores.taxon[0])
        genus = [a for a in result.rank_confidences if a.rank == "genus"]
        result.rank_confidences = [*self.rank_answers(scores, 0), *genus]
        result.confidence = float(np.clip(scores.routed.confidence[0], 0.0, 1.0))
        result.method = Method(int(scores.routed.method[0]))
        if rank == "species":
            result.species = result.taxon = taxon
            result.rank = "species"  # the seed's level is species_name, whatever the name
            result.record = catalog.get(taxon)
        elif rank:
            result.species, result.rank, result.taxon = "", rank, taxon
            result.record = self.taxon_record(rank, taxon)
        else:
            result.species, result.rank, result.taxon, result.record = "", "", "", None
        return result
