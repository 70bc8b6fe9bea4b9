"""IdentifyObservation, and Identify with a place and date: requests -> combined decisions.

The photos go through the same ``Identifier`` as Identify (decode, embed,
score), the combination is ``server.observation``'s and the place-and-season
factor ``server.prior``'s; this module checks requests, picks what to
combine and says which evidence moved the answer. The prior and the fitted
combiner are read once at start-up from ``BUNDLE/prior/`` or, failing that,
``DATA_DIR/prior/`` (``biolit-id prior fit`` / ``calibrate``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.batcher import current_queue_ms
from biolit_id.server.catalog import Catalog
from biolit_id.server.errors import error_context
from biolit_id.server.limits import MAX_OBSERVATION_PHOTOS
from biolit_id.server.messages import RANK_TO_PB, identify_response, taxonomy_message
from biolit_id.server.observation import (
    COMBINER_JSON,
    Combined,
    CombinerParams,
    combine,
    photo_weight,
    pooled_embedding,
    temper_pooled,
)
from biolit_id.server.pipeline import (
    Identification,
    Identifier,
    InvalidRequestError,
    _record_for_taxon,
)
from biolit_id.server.prior import (
    PRIOR_DIR,
    PRIOR_JSON,
    SpaceSeasonPrior,
    Where,
    check_location,
    load_prior,
    parse_observed_on,
    relative_factor,
)
from biolit_id.server.taxonomy import rank_confidences, taxon_fallback

NO_PRIOR = "this service has no place-and-season prior (biolit-id prior fit)"


@dataclass(frozen=True)
class ObservationSetup:
    """The fitted combiner and, when there is one, the prior; ``version`` names both."""

    params: CombinerParams = field(default_factory=CombinerParams)
    prior: SpaceSeasonPrior | None = None
    folder: Path | None = None
    version: str = ""


def load_observation_setup(bundle_dir: Path | None, data_dir: Path) -> ObservationSetup:
    """``BUNDLE/prior/`` when it has a prior or a combiner, else ``DATA_DIR/prior/``."""
    candidates = ([Path(bundle_dir) / PRIOR_DIR] if bundle_dir else []) + [
        Path(data_dir) / PRIOR_DIR]
    for folder in candidates:
        has_prior = (folder / PRIOR_JSON).is_file()
        if has_prior or (folder / COMBINER_JSON).is_file():
            prior = load_prior(folder) if has_prior else None  # PriorError: refuse to start
            params = CombinerParams.load(folder)
            body = f"{prior.version if prior else ''}/{params.digest()}"
            return ObservationSetup(params, prior, folder,
                                    hashlib.sha256(body.encode()).hexdigest()[:16])
    return ObservationSetup()


# ---------------------------------------------------------------- requests


def place_and_date(location: pb.Location | None, observed_on: str
                   ) -> tuple[Where | None, float | None]:
    """The request's checked place and day angle (either may be None)."""
    where = None
    if location is not None:
        where = check_location(location.latitude, location.longitude, location.uncertainty_m)
    return where, parse_observed_on(observed_on)


def identify_place_date(request: pb.IdentifyRequest) -> tuple[Where | None, float | None]:
    return place_and_date(request.location if request.HasField("location") else None,
                          request.observed_on)


def _photo_rows(ident: Identifier, photos: Sequence[pb.ObservationPhoto]
                ) -> tuple[np.ndarray, dict[str, float]]:
    """Each photo as a unit embedding row (photos decoded and embedded in one batch)."""
    rows: list[np.ndarray | None] = [None] * len(photos)
    pixels, where = [], []
    timing = {"decode_ms": 0.0, "embed_ms": 0.0}
    t0 = time.perf_counter()
    for i, photo in enumerate(photos):
        with error_context(prefix=f"photos[{i}]: "):
            if bool(photo.image) == (len(photo.embedding) > 0):
                raise InvalidRequestError("set exactly one of image or embedding")
            if photo.image:
                pixels.append(ident.decode(photo.image))
                where.append(i)
            else:
                rows[i] = ident.check_embedding(photo.embedding)
    t1 = time.perf_counter()
    if pixels:
        for i, row in zip(where, ident.embed_fn(np.stack(pixels)), strict=True):
            rows[i] = row
        queue_ms = current_queue_ms()  # the wait for a model batch, not embedding time
        timing = {"decode_ms": (t1 - t0) * 1e3, "queue_ms": queue_ms,
                  "embed_ms": max(0.0, (time.perf_counter() - t1) * 1e3 - queue_ms)}
    return np.stack(rows).astype(np.float32), timing


def _prior_factor(setup: ObservationSetup, names: Sequence[str], where: Where | None,
                  day: float | None) -> np.ndarray | None:
    if setup.prior is None or (where is None and day is None):
        return None
    density, known, background = setup.prior.densities(names, where, day)
    return relative_factor(density, known, background, setup.params.prior_floor)


# ---------------------------------------------------------------- decisions


def decide(probs: np.ndarray, names: Sequence[str], catalog: Catalog, bundle,
           answer: float) -> tuple[pb.Decision, pb.Taxonomy, list[pb.RankConfidence]]:
    """The combined distribution's answer: its best species when it passes ``answer``,
    else the finest taxon passing its calibrated threshold, else a rejection."""
    answers = rank_confidences(SimpleNamespace(distribution=probs[None]), names, catalog)
    ranks = [pb.RankConfidence(rank=RANK_TO_PB[a.rank], taxon=a.taxon, confidence=a.confidence)
             for a in answers]
    idx = int(np.argmax(probs)) if len(probs) else -1
    top = float(np.clip(probs[idx], 0.0, 1.0)) if idx >= 0 else 0.0
    if idx >= 0 and top > 0 and top >= answer:
        record = catalog.get(names[idx])
        rank = record.rank if record else "species"
        decision = pb.Decision(species=names[idx], confidence=top,
                               method=pb.METHOD_OBSERVATION,
                               rank=RANK_TO_PB.get(rank, pb.RANK_SPECIES), taxon=names[idx])
        return decision, taxonomy_message(record) if record else pb.Taxonomy(), ranks
    fallback = taxon_fallback(answers, bundle)
    if fallback is not None:
        record = _record_for_taxon(catalog, fallback.rank, fallback.taxon)
        decision = pb.Decision(confidence=fallback.confidence, method=pb.METHOD_TAXON,
                               rank=RANK_TO_PB[fallback.rank], taxon=fallback.taxon)
        return decision, taxonomy_message(record, fallback.rank), ranks
    return pb.Decision(confidence=top, method=pb.METHOD_REJECTED), pb.Taxonomy(), ranks


def prior_evidence(photos_only: np.ndarray, with_prior: np.ndarray, factor: np.ndarray | None,
                   names: Sequence[str], weight: float, where: Where | None,
                   day: float | None, top_k: int, reason: str = "") -> pb.PriorEvidence:
    before = int(np.argmax(photos_only))
    evidence = pb.PriorEvidence(answer_without_prior=names[before],
                                confidence_without_prior=float(photos_only[before]))
    if factor is None:
        evidence.reason = reason
        return evidence
    evidence.applied = True
    evidence.used_location = where is not None
    evidence.used_date = day is not None
    evidence.weight = weight
    evidence.changed_answer = int(np.argmax(with_prior)) != before
    rank_before = np.empty(len(names), dtype=np.int64)
    rank_before[np.argsort(-photos_only, kind="stable")] = np.arange(1, len(names) + 1)
    rank_after = np.empty(len(names), dtype=np.int64)
    rank_after[np.argsort(-with_prior, kind="stable")] = np.arange(1, len(names) + 1)
    shown = [i for i in range(len(names))
             if (rank_before[i] <= top_k or rank_after[i] <= top_k) and photos_only[i] > 0]
    for i in sorted(shown, key=lambda i: rank_after[i]):
        evidence.shifts.append(pb.PriorShift(
            species=names[i], without_prior=float(photos_only[i]),
            prior_factor=float(factor[i]), with_prior=float(with_prior[i]),
            rank_without_prior=int(rank_before[i]), rank_with_prior=int(rank_after[i])))
    return evidence


def _candidates(probs: np.ndarray, names: Sequence[str], k: int) -> list[pb.Candidate]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [pb.Candidate(species=names[i], score=float(probs[i])) for i in order if probs[i] > 0]


# ---------------------------------------------------------------- the RPCs


def identify_observation(state, request: pb.IdentifyObservationRequest
                         ) -> pb.IdentifyObservationResponse:
    ident: Identifier = state.identifier
    setup: ObservationSetup = state.observations
    params = setup.params
    started = time.perf_counter()
    n = len(request.photos)
    cap = int(state.config.extra.get("max_observation_photos", MAX_OBSERVATION_PHOTOS))
    if n == 0:
        raise InvalidRequestError("photos is empty: send 1 to "
                                  f"{cap} photos of the observation")
    if n > cap:
        raise InvalidRequestError(f"photos has {n} entries, at most {cap} allowed")
    where, day = place_and_date(request.location if request.HasField("location") else None,
                                request.observed_on)
    options = ident.options(request.top_k, request.num_similar, list(request.restrict_to),
                            request.include_thumbnails)
    rows, timing = _photo_rows(ident, request.photos)
    results = ident.identify_embeddings(rows, [options] * n)
    names = results[0].names
    photos = np.stack([r.distribution for r in results])
    allowed = (photos > 0).any(axis=0) if request.restrict_to else None
    factor = _prior_factor(setup, names, where, day)
    combined: Combined | None = None
    if params.method == "pooled" and n > 1:
        pooled = ident.identify_embeddings(pooled_embedding(rows)[None], [options])[0]
        probs, photos_only = (a[0] for a in temper_pooled(
            pooled.distribution[None], np.array([n]), params,
            None if factor is None else factor[None]))
    else:
        combined = combine(photos, params, factor, allowed)
        probs, photos_only = combined.probs[0], combined.photos_only[0]
    decision, taxonomy, ranks = decide(probs, names, state.catalog, state.scorer.bundle,
                                       params.answer)
    versions = state.versions()
    reason = "" if factor is not None else (
        NO_PRIOR if setup.prior is None and (where is not None or day is not None)
        else "the request has no location or observed_on")
    evidence = _evidence(params, combined, photos, probs, photos_only, names, n)
    evidence.prior.CopyFrom(prior_evidence(photos_only, probs, factor, names,
                                           params.prior_weight, where, day, options.top_k,
                                           reason))
    total = {k: sum(r.timing.get(k, 0.0) for r in results) for k in ("score_ms", "search_ms")}
    return pb.IdentifyObservationResponse(
        decision=decision,
        candidates=_candidates(probs, names, options.top_k),
        taxonomy=taxonomy,
        rank_confidences=ranks,
        photos=[identify_response(r, versions) for r in results],
        evidence=evidence,
        versions=versions,
        timing=pb.Timing(**timing, **total, total_ms=(time.perf_counter() - started) * 1e3),
        request_id=request.request_id,
    )


def _evidence(params: CombinerParams, combined: Combined | None, photos: np.ndarray,
              probs: np.ndarray, photos_only: np.ndarray, names: Sequence[str],
              n: int) -> pb.ObservationEvidence:
    answer = int(np.argmax(probs))
    best = int(np.argmax(photos_only))
    kept = int(combined.kept_count[0]) if combined is not None else n
    weight = float(photo_weight(kept, params.rho)) if combined is not None else 1.0
    evidence = pb.ObservationEvidence(
        combiner=params.method if n > 1 else "single photo",
        photo_weight=weight, effective_photos=kept * weight,
        answer_from_photos=names[best], confidence_from_photos=float(photos_only[best]))
    for i, p in enumerate(photos):
        top = int(np.argmax(p))
        evidence.photos.append(pb.PhotoEvidence(
            index=i, top_species=names[top], top_probability=float(p[top]),
            answer_probability=float(p[answer]), agrees=top == answer,
            outlier_probability=float(combined.outlier_probability[0, i]) if combined else 0.0,
            excluded=bool(combined is not None and not combined.kept[0, i])))
    return evidence


def identify_with_prior(state, request: pb.IdentifyRequest, result: Identification,
                        response: pb.IdentifyResponse) -> None:
    """Identify with a location or date: the decision becomes photo x prior (in place)."""
    where, day = identify_place_date(request)
    if where is None and day is None:
        return
    setup: ObservationSetup = state.observations
    probs = result.distribution
    factor = _prior_factor(setup, result.names, where, day)
    if factor is None:
        response.prior.CopyFrom(pb.PriorEvidence(reason=NO_PRIOR))
        return
    with_prior = combine(probs[None], setup.params, factor).probs[0]
    decision, taxonomy, ranks = decide(with_prior, result.names, state.catalog,
                                       state.scorer.bundle, setup.params.answer)
    response.decision.CopyFrom(decision)
    response.taxonomy.CopyFrom(taxonomy)
    del response.rank_confidences[:]
    response.rank_confidences.extend(ranks)
    k = max(len(response.prototype_candidates), 1)
    response.prior.CopyFrom(prior_evidence(probs, with_prior, factor, result.names,
                                           setup.params.prior_weight, where, day, k))
