"""The gRPC servicer: validation, status codes, and conversion; no scoring here."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc

from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.types import Identification
from biolit_id.server.grpc import observation
from biolit_id.server.grpc.curation import CurationServicer
from biolit_id.server.grpc.errors import NotFoundError, status_of
from biolit_id.server.grpc.limits import MAX_OBSERVATION_PHOTOS, check_request, deadline_passed
from biolit_id.server.grpc.messages import identify_response, species_message
from biolit_id.server.inference.batcher import (
    DeadlineExceededError,
    current_queue_ms,
    deadline_scope,
    grpc_deadline,
    read_ahead,
)
from biolit_id.server.wiring import ServiceState

log = logging.getLogger(__name__)


class SpeciesIdentifierServicer(CurationServicer, pb_grpc.SpeciesIdentifierServicer):
    def __init__(self, state: ServiceState) -> None:
        self.state = state

    # ------------------------------------------------------------- identify

    def _identify_one(self, request: pb.IdentifyRequest) -> Identification:
        ident = self.state.identifier
        check_request(request)  # field limits; IdentifyStream reports them per item
        observation.identify_place_date(request)  # a bad location or date, before any work
        has_image = bool(request.image)
        has_embedding = len(request.embedding) > 0
        if has_image and has_embedding:
            raise InvalidRequestError("set either image or embedding, not both")
        if not has_image and not has_embedding:
            raise InvalidRequestError("request has neither image nor embedding")
        options = ident.options(
            request.top_k, request.num_similar, list(request.restrict_to),
            request.include_thumbnails,
        )
        started = time.perf_counter()
        if has_embedding:
            vec = ident.check_embedding(request.embedding)
            result = ident.identify_embeddings(vec[None, :], [options])[0]
        else:
            result = ident.identify_images([request.image], [options])[0]
        result.timing["total_ms"] = (time.perf_counter() - started) * 1e3
        if has_image:  # the embed time measured around the batcher includes the wait
            timing = result.timing
            timing["queue_ms"] = current_queue_ms()
            timing["embed_ms"] = max(0.0, timing["embed_ms"] - timing["queue_ms"])
        return result

    def _call_scope(self, deadline: float | None, has_photo: bool):
        """The call's deadline for the batcher (it drops expired photos), and a
        notice that a photo is on its way (it waits for decoding photos only)."""
        batcher = self.state.batcher
        if batcher is None:
            return deadline_scope(deadline)
        return batcher.request_scope(deadline, announce=has_photo)

    def _respond(self, request: pb.IdentifyRequest, result: Identification) -> pb.IdentifyResponse:
        result, prior = observation.with_place_and_date(self.state, request, result)
        response = identify_response(result, self.state.versions(), request.request_id)
        if prior is not None:
            response.prior.CopyFrom(prior)
        return response

    def IdentifyObservation(self, request: pb.IdentifyObservationRequest,
                            context: grpc.ServicerContext):
        has_photo = any(photo.image for photo in request.photos)
        with self._call_scope(grpc_deadline(context), has_photo):
            return observation.identify_observation(self.state, request)

    def Identify(self, request: pb.IdentifyRequest, context: grpc.ServicerContext):
        with self._call_scope(grpc_deadline(context), bool(request.image)):
            result = self._identify_one(request)
        return self._respond(request, result)

    def IdentifyStream(self, request_iterator: Iterator[pb.IdentifyRequest],
                       context: grpc.ServicerContext):
        # Read-ahead: several photos of the stream are decoded and queued at once so
        # that one stream fills model batches; responses keep the request order.
        cfg = self.state.config
        deadline = grpc_deadline(context)

        def answer(request: pb.IdentifyRequest) -> pb.IdentifyResponse:
            with self._call_scope(deadline, bool(request.image)):
                return self._stream_item(request)

        window = cfg.stream_read_ahead or cfg.max_batch_size
        for response in read_ahead(request_iterator, answer, window):
            if deadline_passed(context):  # the client has given up: do no more work
                raise DeadlineExceededError("stream deadline passed")
            yield response

    def _stream_item(self, request: pb.IdentifyRequest) -> pb.IdentifyResponse:
        """One stream item; its errors are reported in its response, not the stream's."""
        try:
            return self._respond(request, self._identify_one(request))
        except Exception as exc:
            found = status_of(exc)  # the table every RPC's errors go through
            if found is None:  # a bug must cost one item, not the whole stream
                log.exception("IdentifyStream item %r failed", request.request_id)
                found = grpc.StatusCode.INTERNAL, "internal error on this item"
            code, message = found
        return pb.IdentifyResponse(
            request_id=request.request_id,
            error=pb.ItemError(code=code.value[0], message=message),
        )

    # -------------------------------------------------------------- catalog

    def _species(self, name: str, counts: dict[str, int] | None = None) -> pb.Species:
        state = self.state
        bundle = state.bundle
        if counts is None:
            counts = state.gallery.exemplar_counts() if state.gallery is not None else {}
        exemplars = counts.get(name, 0)
        return species_message(
            state.catalog.get(name),
            in_classifier=bool(bundle and name in bundle.common),
            has_prototype=name in state.identifier.prototypes().names,
            has_visual_prototype=bool(bundle and name in bundle.species) or exemplars > 0,
            exemplar_count=exemplars,
        )

    def ListSpecies(self, request: pb.ListSpeciesRequest, context: grpc.ServicerContext):
        catalog: Catalog = self.state.catalog
        names = catalog.names()
        if request.taxon:
            wanted = set(catalog.species_under(request.taxon))  # UnknownTaxonError: NOT_FOUND
            names = [n for n in names if n in wanted]
        gallery = self.state.gallery
        counts = gallery.exemplar_counts() if gallery is not None else {}
        return pb.ListSpeciesResponse(species=[self._species(n, counts) for n in names])

    def GetSpecies(self, request: pb.GetSpeciesRequest, context: grpc.ServicerContext):
        if request.scientific_name not in self.state.catalog:
            raise NotFoundError(
                f"species {request.scientific_name!r} is not in the catalog (see ListSpecies)")
        return self._species(request.scientific_name)

    def GetServiceInfo(self, request: pb.GetServiceInfoRequest, context: grpc.ServicerContext):
        from biolit_id.server.inference.types import MAX_NUM_SIMILAR, MAX_RESTRICT_TO, MAX_TOP_K

        state = self.state
        cfg = state.config
        policy = state.identifier.policy
        scorer = state.scorer
        th = scorer.thresholds
        return pb.ServiceInfo(
            model_id=state.model.spec,
            embedding_dim=state.model.embedding_dim,
            preprocessing=pb.Preprocessing(
                image_size=policy.image_size,
                resize_mode="resize",
                mean=list(policy.mean),
                std=list(policy.std),
                exif_transpose=True,
            ),
            catalog_size=len(state.catalog),
            gallery_size=getattr(state.gallery, "size", 0),
            versions=state.versions(),
            runtime=state.embedder.runtime,
            precision=state.embedder.precision,
            mode=scorer.mode,
            thresholds=pb.Thresholds(
                classifier_high=th.classifier_high,
                classifier_low=th.classifier_low,
                prototype=th.prototype,
                zero_shot=th.zero_shot,
                temperature=scorer.temperature,
                alpha=scorer.alpha,
                answer=th.answer,
            ),
            limits=pb.Limits(
                max_message_bytes=cfg.max_message_bytes,
                max_image_pixels=cfg.max_image_pixels,
                max_batch_size=cfg.max_batch_size,
                max_batch_wait_ms=cfg.max_batch_wait_ms,
                max_queue_size=cfg.max_queue_size,
                max_top_k=MAX_TOP_K,
                max_num_similar=MAX_NUM_SIMILAR,
                max_restrict_to=MAX_RESTRICT_TO,
                max_observation_photos=int(cfg.extra.get("max_observation_photos",
                                                         MAX_OBSERVATION_PHOTOS)),
            ),
            gallery_backend=cfg.gallery.split(":", 1)[0],
        )

