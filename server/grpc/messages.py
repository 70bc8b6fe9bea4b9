"""Pipeline results -> protobuf messages (the only place that knows both)."""

from __future__ import annotations

from biolit_id.index.core.types import SimilarHit
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.catalog.catalog import LINEAGE_RANKS, SpeciesRecord
from biolit_id.server.decision.types import Identification, Method

RANK_TO_PB = {
    "kingdom": pb.RANK_KINGDOM,
    "phylum": pb.RANK_PHYLUM,
    "class": pb.RANK_CLASS,
    "order": pb.RANK_ORDER,
    "family": pb.RANK_FAMILY,
    "genus": pb.RANK_GENUS,
    "species": pb.RANK_SPECIES,
    "subspecies": pb.RANK_SUBSPECIES,
    "species_group": pb.RANK_SPECIES_GROUP,
}
PB_TO_RANK = {v: k for k, v in RANK_TO_PB.items()}
METHOD_TO_PB = {m: pb.Method.Value(f"METHOD_{m.name}") for m in Method}


def taxonomy_message(record: SpeciesRecord | None, down_to: str = "species") -> pb.Taxonomy:
    if record is None:
        return pb.Taxonomy()
    stop = LINEAGE_RANKS.index(down_to) if down_to in LINEAGE_RANKS else len(LINEAGE_RANKS) - 1
    lineage = [
        pb.Taxon(rank=RANK_TO_PB[rank], name=name)
        for rank, name in record.lineage()
        if LINEAGE_RANKS.index(rank) <= stop
    ]
    vernacular = []
    if down_to in {"species", "subspecies", "species_group"} or stop == len(LINEAGE_RANKS) - 1:
        vernacular = [
            pb.VernacularName(name=name, language=lang)
            for lang, names in sorted(record.vernacular.items())
            for name in names
        ]
    return pb.Taxonomy(lineage=lineage, vernacular_names=vernacular)


def similar_message(hit: SimilarHit) -> pb.SimilarExemplar:
    return pb.SimilarExemplar(
        exemplar_id=hit.exemplar_id,
        species=hit.species,
        score=hit.score,
        thumbnail=hit.thumbnail,
        **hit.meta_dict(),
    )


def decision_parts(result: Identification
                   ) -> tuple[pb.Decision, pb.Taxonomy, list[pb.RankConfidence]]:
    """An answer's decision, the taxonomy down to its rank, and the per-rank masses."""
    species_answer = bool(result.species)
    decision = pb.Decision(
        species=result.species,
        confidence=result.confidence,
        method=METHOD_TO_PB[result.method],
        rank=RANK_TO_PB.get(result.rank, pb.RANK_UNSPECIFIED),
        taxon=result.taxon,
    )
    taxonomy = (taxonomy_message(result.record, "species" if species_answer else result.rank)
                if result.record is not None else pb.Taxonomy())
    ranks = [pb.RankConfidence(rank=RANK_TO_PB[a.rank], taxon=a.taxon, confidence=a.confidence)
             for a in result.rank_confidences]
    return decision, taxonomy, ranks


def identify_response(result: Identification, versions: pb.Versions,
                      request_id: str = "") -> pb.IdentifyResponse:
    decision, taxonomy, ranks = decision_parts(result)
    return pb.IdentifyResponse(
        decision=decision,
        classifier_candidates=[
            pb.Candidate(species=n, score=s) for n, s in result.classifier_candidates
        ],
        prototype_candidates=[
            pb.Candidate(species=n, score=s) for n, s in result.prototype_candidates
        ],
        taxonomy=taxonomy,
        similar=[similar_message(h) for h in result.similar],
        versions=versions,
        timing=pb.Timing(**result.timing),
        request_id=request_id,
        rank_confidences=ranks,
    )


def species_message(record: SpeciesRecord, in_classifier: bool, has_prototype: bool,
                    has_visual_prototype: bool, exemplar_count: int = 0) -> pb.Species:
    return pb.Species(
        scientific_name=record.scientific_name,
        rank=RANK_TO_PB.get(record.rank, pb.RANK_SPECIES),
        taxonomy=taxonomy_message(record),
        description=record.description,
        in_classifier=in_classifier,
        has_prototype=has_prototype,
        has_text_prototype=True,
        has_visual_prototype=has_visual_prototype,
        exemplar_count=exemplar_count,
        added_at_runtime=record.added_at_runtime,
        gbif_match_type=record.gbif.match_type,
        gbif_status=record.gbif.status,
        gbif_usage_key=record.gbif.usage_key,
    )
