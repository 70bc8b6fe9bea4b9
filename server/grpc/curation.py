"""Gallery RPCs: AddExemplars, RemoveExemplars, ListExemplars, SearchSimilar, AddSpecies.

Mixed into ``SpeciesIdentifierServicer``: this module validates and decodes,
the gallery (``state.gallery``) does the work, and errors are raised for
``server.grpc.errors`` to map, so every RPC reports a failure with one code.
Stream semantics and codes: docs/api.md.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from biolit_id.index.base import SpeciesExistsError, UnknownSpeciesError
from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.index.core.exemplar import ExemplarMeta
from biolit_id.index.store import ExemplarRow, NewExemplar
from biolit_id.index.writer import StreamWriter
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.catalog.catalog import MAX_NAME_LENGTH, SpeciesRecord
from biolit_id.server.catalog.gbif import apply_lookup, lookup_for_config
from biolit_id.server.catalog.names import check_scientific_name, check_taxon_name
from biolit_id.server.catalog.store import save_records
from biolit_id.server.grpc.errors import NoGalleryError, NotFoundError, error_context
from biolit_id.server.grpc.messages import PB_TO_RANK, similar_message
from biolit_id.server.inference.batcher import grpc_deadline
from biolit_id.server.inference.preprocess import (
    open_image,
    resize_for_model,
    thumbnail_jpeg,
    to_array,
)

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_K = 10
MAX_K = 100
_TOKEN_PREFIX = "exemplars-after:"


def content_hash_of_embedding(values) -> str:
    """SHA-256 of an embedding as float32 little endian, the form clients send."""
    return hashlib.sha256(np.asarray(values, dtype="<f4").tobytes()).hexdigest()


def encode_page_token(after_id: int) -> str:
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{after_id}".encode()).decode()


def decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        if text.startswith(_TOKEN_PREFIX):
            value = int(text[len(_TOKEN_PREFIX):])
            if value >= 0:
                return value
    except (ValueError, UnicodeError):
        pass
    raise InvalidRequestError("page_token is not one this server issued")


def exemplar_message(row: ExemplarRow) -> pb.Exemplar:
    added = Timestamp()
    added.FromNanoseconds(int(row.added_at * 1e9))
    return pb.Exemplar(
        exemplar_id=row.exemplar_id,
        species=row.species,
        added_at=added,
        thumbnail=row.thumbnail,
        content_sha256=row.content_sha256,
        **row.meta_dict(),
    )


class CurationServicer:
    """Needs ``self.state``, ``self._species(name)`` and ``self._call_scope`` (the
    deadline the batcher honours) from the servicer."""

    # -------------------------------------------------------------- helpers
    # Errors are raised, never aborted here: server.grpc.errors maps them to codes.

    def _gallery(self):
        gallery = getattr(self.state, "gallery", None)
        if gallery is None:
            raise NoGalleryError()
        return gallery

    def _new_exemplar(self, request: pb.AddExemplarRequest, gallery) -> NewExemplar | int:
        """The validated exemplar, or the id of the same photo already stored."""
        if not request.species:
            raise InvalidRequestError("species is required")
        if not gallery.knows(request.species):
            raise UnknownSpeciesError(request.species)
        has_image, has_embedding = bool(request.image), len(request.embedding) > 0
        if has_image == has_embedding:
            raise InvalidRequestError("set exactly one of image or embedding")
        ident = self.state.identifier
        if has_embedding:  # a stored duplicate is found by the batch write, with no extra read
            vector = ident.check_embedding(request.embedding)
            digest = content_hash_of_embedding(request.embedding)
            thumbnail = b""
        else:
            digest = hashlib.sha256(request.image).hexdigest()
            existing = gallery.find(request.species, digest)
            if existing is not None:  # idempotent: skip decoding and embedding
                return existing
            img = open_image(request.image, ident.policy)
            pixels = to_array(resize_for_model(img, ident.policy), ident.policy)
            vector = np.asarray(ident.embed_fn(pixels[None]), dtype=np.float32)[0]
            thumbnail = thumbnail_jpeg(img)
        return NewExemplar(
            species=request.species,
            embedding=vector,
            content_sha256=digest,
            thumbnail=thumbnail,
            **ExemplarMeta.of(request).meta_dict(),
        )

    def _species_filter(self, species: str, taxon: str) -> list[str] | None:
        if species and not self.state.gallery.knows(species):
            raise NotFoundError(f"unknown species {species!r}")
        if not taxon:
            return [species] if species else None
        under = self.state.catalog.species_under(taxon)  # UnknownTaxonError: NOT_FOUND
        if species:
            return [species] if species in under else []
        return under

    # ------------------------------------------------------------------ RPCs

    def AddExemplars(self, request_iterator: Iterator[pb.AddExemplarRequest],
                     context: grpc.ServicerContext):
        gallery = self._gallery()
        writer = StreamWriter(gallery)
        try:
            for position, request in enumerate(request_iterator):
                with error_context(f"message {position}: ",
                                   f"; the {position} message(s) before it are stored"):
                    with self._call_scope(grpc_deadline(context), bool(request.image)):
                        item = self._new_exemplar(request, gallery)
                    if isinstance(item, int):
                        writer.add_stored(item)
                    else:
                        writer.add(item)
                if writer.full:
                    _write_batch(writer)
        finally:
            try:  # the rest; after an error, what was validated before it, as it says
                _write_batch(writer)
            finally:
                writer.close()  # prototypes of what was stored, before the call ends
        return pb.AddExemplarsResponse(
            exemplar_ids=writer.ids, species_updated=writer.touched,
            gallery_version=gallery.version,
        )

    def RemoveExemplars(self, request: pb.RemoveExemplarsRequest,
                        context: grpc.ServicerContext):
        gallery = self._gallery()
        if not request.exemplar_ids:
            raise InvalidRequestError("exemplar_ids is empty")
        with error_context(suffix="; nothing was removed"):
            outcome = gallery.remove(list(request.exemplar_ids))
        return pb.RemoveExemplarsResponse(
            removed_count=outcome.removed_count,
            species_updated=outcome.species_updated,
            gallery_version=outcome.version,
        )

    def ListExemplars(self, request: pb.ListExemplarsRequest, context: grpc.ServicerContext):
        gallery = self._gallery()
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise InvalidRequestError(f"page_size must be in [0, {MAX_PAGE_SIZE}] (0 = "
                                      f"{DEFAULT_PAGE_SIZE}), got {request.page_size}")
        after = decode_page_token(request.page_token)
        species = self._species_filter(request.species, "")
        size = request.page_size or DEFAULT_PAGE_SIZE
        rows, total = gallery.list_exemplars(species, after, size + 1,
                                             request.include_thumbnails)
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListExemplarsResponse(
            exemplars=[exemplar_message(r) for r in rows],
            next_page_token=encode_page_token(rows[-1].exemplar_id) if more else "",
            total_count=total,
        )

    def SearchSimilar(self, request: pb.SearchSimilarRequest, context: grpc.ServicerContext):
        gallery = self._gallery()
        given = [bool(request.image), len(request.embedding) > 0, request.exemplar_id != 0]
        if sum(given) != 1:
            raise InvalidRequestError("set exactly one of image, embedding or exemplar_id")
        if request.k < 0 or request.k > MAX_K:
            raise InvalidRequestError(
                f"k must be in [0, {MAX_K}] (0 = {DEFAULT_K}), got {request.k}")
        species = self._species_filter(request.species, request.taxon)
        ident = self.state.identifier
        exclude: list[int] = []
        if request.exemplar_id:
            query = gallery.embedding_of(request.exemplar_id)
            exclude = [request.exemplar_id]  # "more like this one", not itself
        elif request.image:
            with self._call_scope(grpc_deadline(context), True):
                query = ident.embed_images([request.image])[0][0]
        else:
            query = ident.check_embedding(request.embedding)
        if species is not None and not species:
            return pb.SearchSimilarResponse()
        hits = gallery.search(query[None, :], request.k or DEFAULT_K, species,
                              request.include_thumbnails, exclude)[0]
        return pb.SearchSimilarResponse(results=[similar_message(h) for h in hits])

    def AddSpecies(self, request: pb.AddSpeciesRequest, context: grpc.ServicerContext):
        gallery = self._gallery()
        record = _species_record(request)
        if gallery.knows(record.scientific_name):
            raise SpeciesExistsError(
                f"species {record.scientific_name!r} already exists (see GetSpecies)")
        if not request.taxonomy.lineage:
            # GbifUnavailableError: UNAVAILABLE; GbifError: FAILED_PRECONDITION.
            lookup = lookup_for_config(self.state.config, record.scientific_name,
                                       grpc_deadline(context))
            if lookup is not None:
                record = apply_lookup(record, lookup)
        gallery.add_species(record)
        self._save_overlay(record)
        return self._species(record.scientific_name)

    def _save_overlay(self, record: SpeciesRecord) -> None:
        """Also in the catalog overlay, so offline tools (enrich) see the species.

        The gallery's SQLite row is what guarantees the species survives a
        restart; the overlay is a convenience copy that ``enrich`` may improve.
        """
        try:
            save_records(self.state.config.data_dir, [record], self.state.catalog.version)
        except OSError:
            log.exception("catalog overlay not updated")


def _species_record(request: pb.AddSpeciesRequest) -> SpeciesRecord:
    if len(request.scientific_name) > MAX_NAME_LENGTH:
        raise InvalidRequestError("scientific_name is too long")
    name = check_scientific_name(request.scientific_name)  # the grammar of names
    taxonomy: dict[str, str] = {}
    for taxon in request.taxonomy.lineage:
        rank = PB_TO_RANK.get(taxon.rank)
        if rank is None or rank not in {"kingdom", "phylum", "class", "order", "family",
                                        "genus"}:
            if rank in {"species", "subspecies", "species_group"}:
                continue  # the species is the name itself
            raise InvalidRequestError(f"taxonomy: rank {taxon.rank} is not a lineage rank")
        if taxon.name:
            taxonomy[rank] = check_taxon_name(taxon.name, f"taxonomy {rank}", rank == "genus")
    taxonomy["species"] = name
    vernacular: dict[str, list[str]] = {}
    for v in request.vernacular_names:
        if not v.name.strip():
            continue
        lang = (v.language or "und").strip().lower()
        vernacular.setdefault(lang, []).append(v.name.strip())
    return SpeciesRecord(
        scientific_name=name,
        taxonomy=taxonomy,
        vernacular=vernacular,
        description=request.description,
        added_at_runtime=True,
    )


def _write_batch(writer: StreamWriter) -> None:
    """Store the stream's pending photos, naming the messages a failure concerns."""
    span = writer.pending_span
    if span is None:
        return
    first, last = span
    with error_context(f"messages {first}-{last}: ",
                       f"; the {first} message(s) before them are stored"):
        writer.write()
