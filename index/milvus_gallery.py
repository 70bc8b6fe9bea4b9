"""The gallery on Milvus: stateless replicas sharing one gallery, prototypes in memory.

Same public interface as ``index.faiss_gallery.Gallery`` (what ``server.curation``,
the Identifier and the service call), different placement of state:

* Exemplars (vectors, metadata, thumbnails) live in Milvus only (see
  ``milvus_index.py`` for why not SQLite/PostgreSQL). Any replica can add,
  search, list or remove any exemplar; a replica holds no gallery state a
  restart or a crash could lose.
* Prototypes (one small vector per species) stay in each replica's memory as
  the immutable ``PrototypeSet`` the scorer reads without locks. The writer
  replica recomputes a changed species' fused prototype (same
  ``PrototypeBuilder`` as the FAISS gallery) and upserts it, with a new
  version stamp, into the species collection; every replica polls that
  collection every ``poll`` seconds and installs rows whose stamp differs
  from the one it holds. A change made through replica A therefore reaches
  replica B's scoring within one poll interval plus one Milvus round trip.

Version stamps, not a shared counter: Milvus has no atomic increment, and a
read-modify-write counter loses updates when two replicas write at once.
A stamp is ``time_ns`` of the writer (so rows can be polled incrementally,
``version >= newest_seen - 30 s``); replicas only compare stamps for
equality, so clock skew cannot make a replica skip a change, only delay the
incremental poll, and a full sweep every ``sweep`` seconds (default 60)
bounds that. ``gallery_version`` reported to clients is the newest stamp.

Concurrent writers on one species: each writer recomputes from the
exemplars it reads, upserts, then re-reads the species' exemplar ids; if
they differ from what it computed from (another replica added or removed
meanwhile) it recomputes. The last upsert is therefore always computed from
the exemplar set as it stands, without locks across replicas.

Repair (``reconcile``): a replica killed between writing an exemplar and its
species row (or an interrupted ``gallery import``) leaves a row computed
from other photos, and the client's retry does not mend it (it finds the
photo stored and refreshes nothing). So at start and in every full sweep
each species row's ``ids_digest`` is compared with the digest of the
exemplar ids Milvus holds for it, species with photos but no row are looked
for, and those species are recomputed and rewritten. The digest also names
the prototypes' source (the bundle id): rows written with another bundle,
in the same whitened space (a recalibration), are recomputed at start, and
meanwhile installed from this replica's own computation, never trusted.

Consistency: reads and searches use the collection's consistency level
(``Strong`` by default), so an acknowledged add is searchable at once from
every replica; ``consistency=Bounded`` trades that for latency on a cluster.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from biolit_id.core.catalog_view import CatalogView, SpeciesRecordView
from biolit_id.core.types import PrototypeSet, SimilarHit
from biolit_id.index.gallery_base import (
    AddOutcome,
    GalleryBase,
    GalleryError,
    RemoveOutcome,
    SpeciesExistsError,
    UnknownExemplarError,
    UnknownSpeciesError,
    similar_hit,
)
from biolit_id.index.milvus_errors import MilvusGalleryError
from biolit_id.index.milvus_index import MilvusIndex
from biolit_id.index.milvus_rows import (
    EXEMPLAR_META_FIELDS,
    SpeciesRow,
    digest_source,
    exemplar_id_for,
    ids_digest,
)
from biolit_id.index.milvus_target import MilvusTarget
from biolit_id.index.milvus_thumbnail import decode_thumbnail
from biolit_id.index.prototypes import PrototypeBuilder
from biolit_id.index.store import ExemplarRow, NewExemplar

log = logging.getLogger(__name__)

SKEW_MARGIN_NS = 30 * 10**9  # incremental polls re-read this much before the newest stamp
MAX_REFRESH_ATTEMPTS = 5


class MilvusGallery(GalleryBase):
    backend = "milvus"

    def __init__(
        self,
        target: MilvusTarget,
        *,
        catalog: CatalogView,
        model_fingerprint: str,
        embedding_dim: int,
        builder: PrototypeBuilder,
        project: Callable[[np.ndarray], np.ndarray],
        space_id: str,
        index: MilvusIndex | None = None,
    ) -> None:
        super().__init__(catalog=catalog, builder=builder, project=project, space_id=space_id)
        self.target = target
        self.raw_dim = int(embedding_dim)
        self.index = index or MilvusIndex(
            target, dim=self.dim, raw_dim=embedding_dim,
            meta={"model_fingerprint": model_fingerprint, "space_id": space_id,
                  "legacy_space_id": builder.source},
        )
        self._source = digest_source(ids_digest([], builder.source))
        self._stamps: dict[str, int] = {}
        self._records: dict[str, str] = {}  # runtime species: catalog record JSON
        self._created: dict[str, float] = {}
        self.recovery = "milvus"
        self.syncs = 0  # polls that installed changes (logs, tests)
        base = PrototypeSet(tuple(builder.base_names),
                            np.ascontiguousarray(builder.base_vectors, np.float32), version=0)
        self._publish(base)
        rows = self.index.species_rows(with_vectors=True)
        with self._write_lock:
            self._apply(rows, initial=True)
        self.reconcile(rows)
        self._last_sweep = time.monotonic()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if target.poll_seconds > 0:
            self._poller = threading.Thread(target=self._poll_loop, name="gallery-sync",
                                            daemon=True)
            self._poller.start()
        log.info("gallery on Milvus %s: %d photos, %d species rows, sync every %.1f s",
                 target.describe(), self.size, len(self._stamps), target.poll_seconds)

    # ------------------------------------------------------------ read API

    def search(self, embeddings: np.ndarray, k: int, species: Sequence[str] | None = None,
               include_thumbnails: bool = False,
               exclude: Sequence[int] = ()) -> list[list[SimilarHit]]:
        queries = self.project(np.atleast_2d(embeddings))
        if species is not None and not len(species):
            return [[] for _ in range(len(queries))]
        fields = [f for f in EXEMPLAR_META_FIELDS if f != "id"]
        if include_thumbnails:
            fields.append("thumbnail")
        try:
            scores, ids, entities = self.index.search_exemplars(
                queries, k, species=None if species is None else list(species),
                exclude=list(exclude), output_fields=fields)
        except MilvusGalleryError as exc:
            raise GalleryError(str(exc)) from exc
        return [
            [similar_hit(_row({**e, "id": vid}), float(score))
             for score, vid, e in zip(row_scores, row_ids, row_entities, strict=False)
             if vid >= 0]
            for row_scores, row_ids, row_entities in zip(scores, ids, entities, strict=True)
        ]

    def embedding_of(self, exemplar_id: int) -> np.ndarray:
        found = self.index.get([exemplar_id], ["raw"]).get(int(exemplar_id))
        if found is None:
            raise UnknownExemplarError([exemplar_id])
        return np.asarray(found["raw"], dtype=np.float32)

    def list_exemplars(self, species: Sequence[str] | None, after_id: int, limit: int,
                       include_thumbnails: bool = False) -> tuple[list[ExemplarRow], int]:
        ids = self.index.page_ids(after_id, limit, None if species is None else list(species))
        fields = list(EXEMPLAR_META_FIELDS) + (["thumbnail"] if include_thumbnails else [])
        got = self.index.get(ids, fields)
        rows = [_row(got[i]) for i in ids if i in got]
        # From Milvus, not the local counts: those lag other replicas' writes by a poll.
        return rows, self.index.count(None if species is None else list(species))

    def find(self, species: str, content_sha256: str) -> int | None:
        eid = exemplar_id_for(species, content_sha256)
        found = self.index.get([eid], ["species", "content_sha256"]).get(eid)
        if found is not None and (found["species"], found["content_sha256"]) == (
                species, content_sha256):
            return eid
        # Imported from a FAISS gallery (ids kept), or a 62-bit collision, which
        # add_exemplar refuses with a clear error.
        return self.index.find_content(species, content_sha256)

    # ----------------------------------------------------------- write API

    def add_exemplar(self, item: NewExemplar, refresh: bool = True) -> AddOutcome:
        self._check_open()
        raw = np.asarray(item.embedding, dtype=np.float32).reshape(self.raw_dim)
        eid = exemplar_id_for(item.species, item.content_sha256)
        with self._write_lock:
            if not self.knows(item.species):
                raise UnknownSpeciesError(item.species)
            found = self.index.get([eid], ["species", "content_sha256"]).get(eid)
            if found is not None and (found["species"], found["content_sha256"]) == (
                    item.species, item.content_sha256):
                return AddOutcome(eid, False, item.species)
            imported = self.index.find_content(item.species, item.content_sha256)
            if imported is not None:  # stored under its FAISS id by `gallery import`
                return AddOutcome(imported, False, item.species)
            if found is not None:
                raise GalleryError(
                    f"exemplar id {eid} already belongs to another photo (a 62-bit hash "
                    "collision, about 1 in 10^11 per pair); re-encode the photo to add it")
            try:
                row = self.index.exemplar_row(
                    eid, item.species, self.project(raw[None, :])[0], raw,
                    content_sha256=item.content_sha256, source_uri=item.source_uri,
                    observation_id=item.observation_id, license=item.license,
                    contributor=item.contributor, added_at=time.time(),
                    thumbnail=item.thumbnail)
            except ValueError as exc:
                raise GalleryError(f"cannot store this exemplar: {exc}") from exc
            self._write(self.index.insert, [row])
            if refresh:
                self._refresh_locked([item.species])
        return AddOutcome(eid, True, item.species)

    def remove(self, ids: Sequence[int]) -> RemoveOutcome:
        self._check_open()
        wanted = sorted({int(i) for i in ids})
        with self._write_lock:
            found = self.index.get(wanted, ["species"])
            missing = [i for i in wanted if i not in found]
            if missing:
                raise UnknownExemplarError(missing)
            self._write(self.index.remove, wanted)
            species = list(dict.fromkeys(found[i]["species"] for i in wanted))
            self._refresh_locked(species)
        return RemoveOutcome(len(wanted), species, self._version)

    def add_species(self, record: SpeciesRecordView) -> None:
        self._check_open()
        name = record.scientific_name
        with self._write_lock:
            shared = self.index.species_rows(names=[name], with_vectors=True)
            if shared:  # added through another replica since our last poll
                self._apply(shared)
            if self.knows(name):
                raise SpeciesExistsError(f"species {name!r} already exists")
            self._records[name] = json.dumps(record.to_json())
            self._created[name] = time.time()
            self.catalog.add(record)
            self._refresh_locked([name])

    def import_rows(self, rows: Iterable[dict]) -> int:
        """Store exported exemplar rows (ids kept) without refreshing; returns the count.

        Each row: id, species, embedding (raw), content_sha256, source_uri,
        observation_id, license, contributor, added_at, thumbnail (bytes).
        Upserts, so a re-run of an interrupted import is harmless. Call
        ``refresh`` with the species afterwards.
        """
        self._check_open()
        batch = []
        for r in rows:
            raw = np.asarray(r["embedding"], dtype=np.float32).reshape(self.raw_dim)
            batch.append((r, raw))
        if not batch:
            return 0
        projected = self.project(np.stack([raw for _, raw in batch]))
        milvus_rows = [
            self.index.exemplar_row(
                int(r["id"]), r["species"], vec, raw, content_sha256=r["content_sha256"],
                source_uri=r.get("source_uri", ""), observation_id=r.get("observation_id", ""),
                license=r.get("license", ""), contributor=r.get("contributor", ""),
                added_at=float(r.get("added_at", time.time())),
                thumbnail=r.get("thumbnail") or b"")
            for (r, raw), vec in zip(batch, projected, strict=True)
        ]
        with self._write_lock:
            self._write(self.index.insert, milvus_rows)
        return len(milvus_rows)

    # ------------------------------------------------------------- syncing

    def sync_now(self, full: bool = False) -> int:
        """Install prototype rows other replicas changed; returns how many changed.

        ``full``: read every row, not only recent stamps, and ``reconcile`` them.
        """
        since = None if full or not self._version else self._version - SKEW_MARGIN_NS
        before = dict(self._stamps)
        rows = self.index.species_rows(since_version=since)
        changed = [r.species for r in rows if before.get(r.species) != r.version]
        fresh: list[SpeciesRow] = []
        if changed:
            got = self.index.species_rows(names=changed, with_vectors=True)
            with self._write_lock:
                # A write of our own since the read above wins: skip what it changed.
                fresh = [r for r in got if self._stamps.get(r.species) == before.get(r.species)]
                self._apply(fresh)
            self.syncs += 1
        repaired = self.reconcile(rows) if full else []
        return len(fresh) + len(repaired)

    def reconcile(self, rows: Sequence[SpeciesRow] | None = None) -> list[str]:
        """Recompute species whose row disagrees with their photos in Milvus; their names.

        ``rows``: the species rows just read (all of them), else read here.
        See the module docstring (Repair) for why; O(gallery ids) reads.
        """
        rows = self.index.species_rows() if rows is None else rows
        stale = [r.species for r in rows
                 if r.ids_digest != self._digest(self.index.ids_for(r.species))]
        stale += self.index.species_without_rows([r.species for r in rows])
        unknown = [n for n in stale if not self.knows(n)]  # _apply warns about these
        stale = [n for n in stale if n not in unknown]
        if stale:
            log.info("gallery: %d species prototype(s) did not match their photos or bundle "
                     "(an interrupted write, or a new bundle); recomputing %s", len(stale),
                     stale[:10])
            with self._write_lock:
                self._refresh_locked(stale)
        return stale

    def _poll_loop(self) -> None:
        failures = 0
        while not self._stop.wait(self.target.poll_seconds):
            try:
                full = time.monotonic() - self._last_sweep >= self.target.sweep_seconds
                self.sync_now(full=full)
                if full:
                    self._last_sweep = time.monotonic()
                failures = 0
            except Exception as exc:  # keep serving with the prototypes we have
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("gallery sync with Milvus failed %d time(s): %s", failures, exc)

    # ------------------------------------------------------------ internals

    @staticmethod
    def _write(fn, arg) -> None:
        try:
            fn(arg)
        except MilvusGalleryError as exc:
            raise GalleryError(str(exc)) from exc

    def _digest(self, ids: Sequence[int]) -> str:
        return ids_digest(ids, self.builder.source)

    def _next_version(self) -> int:
        return max(time.time_ns(), self._version + 1)

    def _refresh_locked(self, species: Sequence[str]) -> None:
        """Recompute, share and install these species' prototypes (write lock held)."""
        written: list[SpeciesRow] = []
        for name in dict.fromkeys(species):
            for _attempt in range(MAX_REFRESH_ATTEMPTS):
                ids, raw = self.index.embeddings_for(name)
                vec = self.builder.fused(name, self.project(raw))
                digest = self._digest(ids)
                row = SpeciesRow(name, vec, self._next_version(), len(ids), digest,
                                 self._records.get(name, ""),
                                 self._created.setdefault(name, time.time()))
                self._write(self.index.upsert_species, row)
                self._version = max(self._version, row.version)
                if self._digest(self.index.ids_for(name)) == digest:
                    break  # nobody changed the species while we computed
            else:
                log.warning("species %r kept changing during %d prototype refreshes; the "
                            "next change or sync settles it", name, MAX_REFRESH_ATTEMPTS)
            written.append(row)
        self._apply(written)

    def _apply(self, rows: Sequence[SpeciesRow], initial: bool = False) -> None:
        """Install species rows (write lock held): catalog, prototypes, counts, stamps."""
        updates: list[tuple[str, np.ndarray]] = []
        counts = dict(self._counts)
        for r in sorted(rows, key=lambda r: (r.created_at, r.species)):
            if r.record_json and r.species not in self.catalog:
                self.catalog.add(self.catalog.record_from_json(json.loads(r.record_json)))
            if r.record_json:
                self._records[r.species] = r.record_json
            self._created.setdefault(r.species, r.created_at)
            self._stamps[r.species] = r.version
            self._version = max(self._version, r.version)
            if r.count:
                counts[r.species] = r.count
            else:
                counts.pop(r.species, None)
            if r.species not in self.catalog and r.species not in self._row_of:
                log.warning("gallery: %d photos of %r, which is in neither catalog nor bundle; "
                            "they are searchable but give no prototype", r.count, r.species)
                continue
            if r.count and len(r.vector) == self.dim and (
                    digest_source(r.ids_digest) == self._source):
                vec = r.vector
            elif r.count:  # written with another bundle (rolling upgrade): ours, from photos
                _, raw = self.index.embeddings_for(r.species)
                vec = self.builder.fused(r.species, self.project(raw))
            else:  # no photos: the base prototype, fresh from this replica's bundle/catalog
                vec = self.builder.without_photos([r.species])[0]
            updates.append((r.species, vec))
        self._counts = counts
        self._publish(self._updated_prototypes(updates)[0])
        if initial:
            log.debug("installed %d species rows from Milvus", len(rows))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=max(5.0, 2 * self.target.poll_seconds))
        with self._write_lock:
            self.index.close()


def _row(r: dict) -> ExemplarRow:
    return ExemplarRow(
        exemplar_id=int(r["id"]),
        species=r["species"],
        source_uri=r.get("source_uri", ""),
        observation_id=r.get("observation_id", ""),
        license=r.get("license", ""),
        contributor=r.get("contributor", ""),
        added_at=float(r.get("added_at", 0.0)),
        content_sha256=r.get("content_sha256", ""),
        thumbnail=decode_thumbnail(r.get("thumbnail", "")),
    )
