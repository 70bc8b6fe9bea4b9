"""IdentifyObservation, and Identify with a place and date: requests -> combined decisions.

The photos go through the same ``Identifier`` as Identify (decode, embed,
score); the combination, the place-and-season factor and the decision are the
decision room's (``decision.observations``, ``decision.answers``). This module
checks requests, picks what to combine and translates the evidence into
messages.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.decision.answers import answer_distribution, redecided
from biolit_id.server.decision.observations import (
    Combined,
    CombinerParams,
    ObservationSetup,
    combine,
    photo_weight,
    pooled_embedding,
    prior_factor,
    temper_pooled,
)
from biolit_id.server.decision.prior import Where, check_location, parse_observed_on
from biolit_id.server.decision.types import Identification
from biolit_id.server.grpc.errors import error_context
from biolit_id.server.grpc.limits import MAX_OBSERVATION_PHOTOS
from biolit_id.server.grpc.messages import decision_parts, identify_response
from biolit_id.server.inference.batcher import current_queue_ms
from biolit_id.server.inference.pipeline import Identifier

NO_PRIOR = "this service has no place-and-season prior (biolit-id prior fit)"


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


# ---------------------------------------------------------------- decisions


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
    factor = prior_factor(setup, names, where, day)
    combined: Combined | None = None
    if params.method == "pooled" and n > 1:
        pooled = ident.identify_embeddings(pooled_embedding(rows)[None], [options])[0]
        probs, photos_only = (a[0] for a in temper_pooled(
            pooled.distribution[None], np.array([n]), params,
            None if factor is None else factor[None]))
    else:
        combined = combine(photos, params, factor, allowed)
        probs, photos_only = combined.probs[0], combined.photos_only[0]
    decision, taxonomy, ranks = decision_parts(answer_distribution(
        probs, names, state.catalog, state.scorer.bundle, params.answer))
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


def with_place_and_date(state, request: pb.IdentifyRequest, result: Identification
                        ) -> tuple[Identification, pb.PriorEvidence | None]:
    """Identify with a location or date: the decision taken again on photo x prior, before
    any response is built; the evidence says what the prior did (None: nothing asked)."""
    where, day = identify_place_date(request)
    if where is None and day is None:
        return result, None
    setup: ObservationSetup = state.observations
    probs = result.distribution
    factor = prior_factor(setup, result.names, where, day)
    if factor is None:
        return result, pb.PriorEvidence(reason=NO_PRIOR)
    with_prior = combine(probs[None], setup.params, factor).probs[0]
    decided = redecided(result, with_prior, state.catalog, state.scorer.bundle,
                        setup.params.answer)
    k = max(len(result.prototype_candidates), 1)
    return decided, prior_evidence(probs, with_prior, factor, result.names,
                                   setup.params.prior_weight, where, day, k)
