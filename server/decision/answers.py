"""From a decided distribution to the answer: a species, a taxon from the lineage mass, or none.

Every way of asking (one photo, a photo with a place and date, an
observation) ends here, so an answer does not depend on how it was asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import Bundle
from biolit_id.server.decision.ranks import answer_rank, rank_confidences, taxon_fallback
from biolit_id.server.decision.types import Identification, Method, Scores


def explain(scores: Scores, protos: PrototypeSet, catalog: Catalog, bundle: Bundle | None,
            top_k: int) -> Identification:
    """The answer a rule's decision gives: its species, else the finest rank whose lineage
    mass passes the bundle's threshold, else a rejection; with the top candidates."""
    routed = scores.routed
    method = Method(int(routed.method[0]))
    idx = int(routed.species[0])
    k = min(top_k, len(protos.names))
    common_names = [protos.names[g] for g in scores.common_to_global]
    result = Identification(
        method=method,
        species=protos.names[idx] if idx >= 0 else "",
        confidence=float(np.clip(routed.confidence[0], 0.0, 1.0)),
        rank="",
        taxon="",
        classifier_candidates=_top(scores.p_common[0], common_names, k),
        prototype_candidates=_top(scores.p_proto[0], protos.names, k),
        record=None,
    )
    result.rank_confidences = rank_confidences(scores.distribution[0], protos.names, catalog)
    if idx >= 0:
        result.record = catalog.get(result.species)
        result.rank = answer_rank(result.record)
        result.taxon = result.species
        return result
    fallback = taxon_fallback(result.rank_confidences, bundle)
    if fallback is not None:
        result.method = Method.TAXON
        result.rank, result.taxon = fallback.rank, fallback.taxon
        result.confidence = fallback.confidence
        result.record = catalog.first_under(fallback.rank, fallback.taxon)
    return result


def answer_distribution(probs: np.ndarray, names: Sequence[str], catalog: Catalog,
                        bundle: Bundle | None, cut: float,
                        method: Method = Method.OBSERVATION) -> Identification:
    """A combined distribution's answer (photos of one find, or a photo times the prior):
    its best species when that passes ``cut``, else the finest taxon passing its
    threshold, else a rejection."""
    answers = rank_confidences(probs, names, catalog)
    idx = int(np.argmax(probs)) if len(probs) else -1
    top = float(np.clip(probs[idx], 0.0, 1.0)) if idx >= 0 else 0.0
    result = Identification(method=Method.REJECTED, species="", confidence=top, rank="",
                            taxon="", classifier_candidates=[], prototype_candidates=[],
                            record=None, rank_confidences=answers)
    if idx >= 0 and top > 0 and top >= cut:
        record = catalog.get(names[idx])
        return replace(result, method=method, species=names[idx], taxon=names[idx],
                       rank=answer_rank(record), record=record)
    fallback = taxon_fallback(answers, bundle)
    if fallback is not None:
        return replace(result, method=Method.TAXON, confidence=fallback.confidence,
                       rank=fallback.rank, taxon=fallback.taxon,
                       record=catalog.first_under(fallback.rank, fallback.taxon))
    return result


def redecided(result: Identification, probs: np.ndarray, catalog: Catalog,
              bundle: Bundle | None, cut: float) -> Identification:
    """``result`` with its decision taken again on ``probs`` (the photo times the prior);
    its candidates stay the photo's own."""
    decided = answer_distribution(probs, result.names, catalog, bundle, cut)
    return replace(result, method=decided.method, species=decided.species,
                   confidence=decided.confidence, rank=decided.rank, taxon=decided.taxon,
                   record=decided.record, rank_confidences=decided.rank_confidences)


def _top(probs: np.ndarray, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    if probs.size == 0:
        return []
    k = min(k, probs.size)
    idx = np.argsort(-probs, kind="stable")[:k]
    idx = idx[probs[idx] > 0]  # species masked out by restrict_to have exactly 0: never listed
    return [(names[i], float(probs[i])) for i in idx]
