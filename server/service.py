"""The gRPC servicer: validation, status codes, and conversion; no scoring here."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
from biolit.v1 import identification_pb2 as pb
from biolit.v1 import identification_pb2_grpc as pb_grpc

from server.catalog import Catalog, UnknownTaxonError
from server.curation import CurationServicer
from server.messages import identify_response, species_message
from server.pipeline import Identification, InvalidRequestError
from server.preprocess import ImageDecodeError
from server.state import ServiceState

log = logging.getLogger(__name__)

# Errors a client caused: INVALID_ARGUMENT with the error's own message.
CLIENT_ERRORS = (InvalidRequestError, ImageDecodeError, UnknownTaxonError)


class SpeciesIdentifierServicer(CurationServicer, pb_grpc.SpeciesIdentifierServicer):
    def __init__(self, state: ServiceState) -> None:
        self.state = state

    # ------------------------------------------------------------- identify

    def _identify_one(self, request: pb.IdentifyRequest) -> Identification:
        ident = self.state.identifier
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
        if has_embedding:
            vec = ident.check_embedding(request.embedding)
            return ident.identify_embeddings(vec[None, :], [options])[0]
        return ident.identify_images([request.image], [options])[0]

    def _respond(self, request: pb.IdentifyRequest, result: Identification) -> pb.IdentifyResponse:
        return identify_response(result, self.state.versions(), request.request_id)

    def Identify(self, request: pb.IdentifyRequest, context: grpc.ServicerContext):
        try:
            result = self._identify_one(request)
        except CLIENT_ERRORS as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(exc))
        return self._respond(request, result)

    def IdentifyStream(self, request_iterator: Iterator[pb.IdentifyRequest],
                       context: grpc.ServicerContext):
        for request in request_iterator:
            try:
                result = self._identify_one(request)
            except CLIENT_ERRORS as exc:
                yield pb.IdentifyResponse(
                    request_id=request.request_id,
                    error=pb.ItemError(
                        code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=_message(exc)
                    ),
                )
                continue
            yield self._respond(request, result)

    # -------------------------------------------------------------- catalog

    def _species(self, name: str) -> pb.Species:
        state = self.state
        record = state.catalog.get(name)
        protos = state.identifier.prototypes()
        in_head = bool(state.bundle and name in state.bundle.common)
        counts = getattr(state.gallery, "exemplar_counts", dict)()
        return species_message(
            record,
            in_classifier=in_head,
            has_prototype=name in protos.names,
            exemplar_count=counts.get(name, 0),
        )

    def ListSpecies(self, request: pb.ListSpeciesRequest, context: grpc.ServicerContext):
        catalog: Catalog = self.state.catalog
        names = catalog.names()
        if request.taxon:
            try:
                wanted = set(catalog.species_under(request.taxon))
            except UnknownTaxonError:
                context.abort(grpc.StatusCode.NOT_FOUND, f"unknown taxon {request.taxon!r}")
            names = [n for n in names if n in wanted]
        return pb.ListSpeciesResponse(species=[self._species(n) for n in names])

    def GetSpecies(self, request: pb.GetSpeciesRequest, context: grpc.ServicerContext):
        if request.scientific_name not in self.state.catalog:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"species {request.scientific_name!r} is not in the catalog (see ListSpecies)",
            )
        return self._species(request.scientific_name)

    def GetServiceInfo(self, request: pb.GetServiceInfoRequest, context: grpc.ServicerContext):
        from server.pipeline import MAX_NUM_SIMILAR, MAX_RESTRICT_TO, MAX_TOP_K

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
            ),
            gallery_backend=cfg.gallery.split(":", 1)[0],
        )


def _message(exc: Exception) -> str:
    return str(exc.args[0]) if exc.args else str(exc)
