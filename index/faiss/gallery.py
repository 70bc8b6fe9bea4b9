"""The reference gallery on FAISS: durable exemplars, one index, live prototypes.

Curators add photos while the service runs and the next Identify uses them.
SQLite is the source of truth (raw embeddings), the FAISS index is derived
and rebuildable, and each write publishes a new immutable prototype set, so
readers never lock. Spaces, locking, recovery and options: docs/gallery.md.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from biolit_id.index.base import (
    AddOutcome,
    GalleryBase,
    GallerySpace,
    RemoveOutcome,
    SpeciesExistsError,
    UnknownExemplarError,
    UnknownSpeciesError,
    similar_hit,
)
from biolit_id.index.core.catalog_view import CatalogView, SpeciesRecordView
from biolit_id.index.core.types import PrototypeSet, SimilarHit
from biolit_id.index.faiss.lock import lock_gallery
from biolit_id.index.faiss.snapshot import (
    SnapshotError,
    SnapshotMeta,
    read_snapshot,
    write_snapshot,
)
from biolit_id.index.faiss.vector_index import IndexSpec, VectorIndex
from biolit_id.index.prototypes import PrototypeBuilder, SpeciesSums
from biolit_id.index.store import ExemplarRow, GalleryStore, NewExemplar

log = logging.getLogger(__name__)

STORE_FILE = "gallery.sqlite3"
SNAPSHOT_FILE = "index.snapshot"
DEFAULT_SNAPSHOT_EVERY = 5000
SNAPSHOT_SHARE = 0.25  # changes, as a share of the gallery, between snapshots
TRAINING_SAMPLE = 200_000
INDEX_CHUNK = 4096  # photos read from the store per index add, when rebuilding


class FaissGallery(GalleryBase):
    backend = "faiss"

    def __init__(
        self,
        directory: Path,
        *,
        catalog: CatalogView,
        builder: PrototypeBuilder,
        space: GallerySpace,
        index_spec: IndexSpec | None = None,
        snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
        exclusive: bool = False,
    ) -> None:
        super().__init__(catalog=catalog, builder=builder, space=space)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.index_spec = index_spec or IndexSpec()
        self.snapshot_every = snapshot_every
        # Shared by servers, exclusive for `gallery rebuild` (index/faiss/lock.py).
        self.exclusive = exclusive
        self._owner_fd = lock_gallery(self.directory, exclusive)
        try:
            self._open(space.model_fingerprint, space.embedding_dim)
        except BaseException:
            if getattr(self, "store", None) is not None:
                self.store.close()
            os.close(self._owner_fd)
            raise

    def _open(self, model_fingerprint: str, embedding_dim: int) -> None:
        """Store, prototypes and index; apart so that a failure releases the owner lock."""
        self.store = GalleryStore(self.directory / STORE_FILE, model_fingerprint, embedding_dim)
        self._snapshot_lock = threading.Lock()
        self._snapshot_thread: threading.Thread | None = None
        self._version = self.store.version()
        self._snapshot_version = -1
        # How the index was opened: "snapshot", "snapshot+replay" or "rebuild" (logs, tests).
        self.recovery = ""
        self._load_runtime_species()
        self._counts = self.store.counts()
        self._sums: dict[str, SpeciesSums] = self.store.species_sums(self.space_id)
        self._publish(self._initial_prototypes())
        self.index, dirty = self._open_index()
        self.index.drop_prototypes()
        self.index.set_prototypes(np.arange(len(self._protos.names)), self._protos.vectors)
        if dirty:
            self.snapshot()

    # ------------------------------------------------------------ read API

    def search(self, embeddings: np.ndarray, k: int, species: Sequence[str] | None = None,
               include_thumbnails: bool = False,
               exclude: Sequence[int] = ()) -> list[list[SimilarHit]]:
        """Nearest exemplars of raw embeddings [B, D], optionally among some species."""
        queries = self.project(np.atleast_2d(embeddings))
        only = None
        if species is not None:
            only = self.store.ids_for(list(species))
            if not len(only):
                return [[] for _ in range(len(queries))]
        excluded = {int(i) for i in exclude}
        scores, ids = self.index.search_exemplars(queries, k + len(excluded), only)
        wanted = {int(i) for i in ids.ravel() if i >= 0 and int(i) not in excluded}
        rows = self.store.rows(sorted(wanted), include_thumbnails) if wanted else {}
        results = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits = []
            for score, vid in zip(row_scores, row_ids, strict=True):
                row = rows.get(int(vid))
                if row is None:  # padding, excluded, or removed since the search
                    continue
                hits.append(similar_hit(row, float(score)))
                if len(hits) == k:
                    break
            results.append(hits)
        return results

    def embedding_of(self, exemplar_id: int) -> np.ndarray:
        found = self.store.embedding(exemplar_id)
        if found is None:
            raise UnknownExemplarError([exemplar_id])
        return found[1]

    def list_exemplars(self, species: Sequence[str] | None, after_id: int, limit: int,
                       include_thumbnails: bool = False) -> tuple[list[ExemplarRow], int]:
        rows = self.store.page(species, after_id, limit, include_thumbnails)
        total = self.store.count(species) if species is not None else self.size
        return rows, total

    def find(self, species: str, content_sha256: str) -> int | None:
        return self.store.find(species, content_sha256)

    # ----------------------------------------------------------- write API

    def add_exemplar(self, item: NewExemplar, refresh: bool = True) -> AddOutcome:
        """Store durably, index, and (unless ``refresh=False``) update the prototype.

        A stream of adds passes ``refresh=False`` and calls ``refresh`` once at
        the end: the prototype is then computed once per species per call, not
        once per photo, and it is still in place before the call is acknowledged.
        """
        self._check_open()
        with self._write_lock:
            if not self.knows(item.species):
                raise UnknownSpeciesError(item.species)
            new_row = item.species not in self._row_of
            projected = self.project(np.asarray(item.embedding, np.float32)[None, :])
            sums = self._sums_of(item.species).plus(projected)
            exemplar_id, created, version = self.store.insert_exemplar(
                item, new_row, sums=sums, space_id=self.space_id)
            if created:
                self.index.add([exemplar_id], projected)
                self._sums[item.species] = sums
                counts = dict(self._counts)
                counts[item.species] = counts.get(item.species, 0) + 1
                self._counts = counts
                self._version = version
                if refresh:
                    self._refresh_locked([item.species])
        if created:
            self._maybe_snapshot()
        return AddOutcome(exemplar_id, created, item.species)

    def add_many(self, items: Sequence[NewExemplar]) -> list[AddOutcome]:
        """Bulk add (imports, benchmarks): one transaction, one index add, one publish.

        Durable when it returns, like ``add_exemplar``, but all or nothing.
        """
        self._check_open()
        with self._write_lock:
            for item in items:
                if not self.knows(item.species):
                    raise UnknownSpeciesError(item.species)
            seen: dict[tuple[str, str], int] = {}
            new: list[int] = []  # positions of photos not stored yet
            for pos, item in enumerate(items):
                key = (item.species, item.content_sha256)
                if key not in seen and self.store.find(*key) is None:
                    new.append(pos)
                seen.setdefault(key, pos)
            projected = self.project(np.stack([items[p].embedding for p in new])) if new else []
            sums: dict[str, SpeciesSums] = {}
            for pos, vec in zip(new, projected, strict=True):
                name = items[pos].species
                sums[name] = (sums.get(name) or self._sums_of(name)).plus(vec[None, :])
            fresh_rows = {items[p].species for p in new} - set(self._row_of)
            outcomes, version = self.store.insert_exemplars(
                [items[p] for p in new], fresh_rows, sums, self.space_id)
            self.index.add([i for i, _ in outcomes], projected)
            self._sums.update(sums)
            counts = dict(self._counts)
            for pos in new:
                counts[items[pos].species] = counts.get(items[pos].species, 0) + 1
            self._counts, self._version = counts, version
            self._refresh_locked(list(sums))
            ids = dict(zip(new, (i for i, _ in outcomes), strict=True))
            result = [AddOutcome(ids[pos], True, item.species) if pos in ids
                      else AddOutcome(self.store.find(item.species, item.content_sha256) or 0,
                                      False, item.species)
                      for pos, item in enumerate(items)]
        self._maybe_snapshot()
        return result

    def remove(self, ids: Sequence[int]) -> RemoveOutcome:
        """All or nothing: any unknown id raises UnknownExemplarError, nothing removed."""
        self._check_open()
        with self._write_lock:
            wanted = sorted({int(i) for i in ids})
            found = {i: self.store.embedding(i) for i in wanted}
            missing = [i for i, row in found.items() if row is None]
            if missing:
                raise UnknownExemplarError(missing)
            sums: dict[str, SpeciesSums] = {}
            for name, raw in found.values():
                before = sums.get(name) or self._sums_of(name)
                sums[name] = before.plus(self.project(raw[None, :]), sign=-1)
            try:
                removed, version = self.store.delete_exemplars(wanted, sums=sums,
                                                               space_id=self.space_id)
            except KeyError as exc:
                raise UnknownExemplarError(exc.args[0]) from None
            self._sums.update(sums)
            self.index.remove([i for i, _ in removed])
            counts = dict(self._counts)
            for _, name in removed:
                counts[name] -= 1
                if not counts[name]:
                    del counts[name]
            self._counts = counts
            self._version = version
            species = list(dict.fromkeys(name for _, name in removed))
            self._refresh_locked(species)
        self._maybe_snapshot()
        return RemoveOutcome(len(removed), species, version)

    def add_species(self, record: SpeciesRecordView) -> None:
        """Persist a runtime species, add it to the catalog, give it a text prototype."""
        self._check_open()
        name = record.scientific_name
        with self._write_lock:
            if self.knows(name):
                raise SpeciesExistsError(f"species {name!r} already exists")
            self._version = self.store.insert_species(name, json.dumps(record.to_json()))
            self.catalog.add(record)
            self._refresh_locked([name])

    # ------------------------------------------------------------ internals

    def _refresh_locked(self, species: Sequence[str]) -> None:
        """Publish these species' prototypes from their running sums: no photo is read."""
        updates = [(name, self.builder.fused_from_sums(name, self._sums_of(name)))
                   for name in dict.fromkeys(species)]
        protos, rows = self._updated_prototypes(updates)
        self.index.set_prototypes(rows, protos.vectors[rows])
        self._publish(protos)

    def _refine_locked(self, species: Sequence[str]) -> None:
        refined = {}
        for name in species:
            _, raw = self.store.embeddings_for(name)
            refined[name] = self.builder.refined_sums(self.project(raw))
        self.store.write_species_sums(self.space_id, refined)
        self._sums.update(refined)
        self._refresh_locked(species)

    def _sums_of(self, name: str) -> SpeciesSums:
        return self._sums.get(name) or SpeciesSums.empty(self.dim)

    def _load_runtime_species(self) -> None:
        for text in self.store.runtime_species():
            record = self.catalog.record_from_json(json.loads(text))
            if record.scientific_name in self.catalog:
                # Usually from the catalog overlay (AddSpecies writes both; enrich may have
                # improved it there), or a catalog update now ships it: that record wins.
                continue
            self.catalog.add(record)

    def _initial_prototypes(self) -> PrototypeSet:
        names = list(self.builder.base_names)
        known = set(names)
        for name in self.store.prototype_rows():
            if name not in known and name in self.catalog:
                names.append(name)
                known.add(name)
        with_photos = sorted(self._counts)
        for name in with_photos:  # e.g. a species the previous bundle had and this one lacks
            if name not in known and name in self.catalog:
                names.append(name)
                known.add(name)
        vectors = self.builder.without_photos(names)
        row_of = {n: i for i, n in enumerate(names)}
        # The sums are written with their photos, so they disagree only in a store
        # from before they existed or made in another space: recompute those once.
        stale = sorted(n for n in with_photos
                       if n not in self._sums or self._sums[n].count != self._counts[n])
        stale += sorted(n for n in self._sums if n not in self._counts and self._sums[n].count)
        if stale:
            log.info("gallery: prototype state of %d species missing or from another space; "
                     "recomputing it from their photos", len(stale))
            refined = {}
            for name in stale:
                _, raw = self.store.embeddings_for(name)
                refined[name] = self.builder.refined_sums(self.project(raw))
            self.store.write_species_sums(self.space_id, refined)
            self._sums.update(refined)
        for name in with_photos:
            if name not in row_of:
                log.warning("gallery: %d photos of %r, which is in neither catalog nor bundle; "
                            "they are searchable but give no prototype",
                            self._counts[name], name)
                continue
            vectors[row_of[name]] = self.builder.fused_from_sums(name, self._sums[name])
        return PrototypeSet(tuple(names), np.ascontiguousarray(vectors, np.float32),
                            version=self._version)

    # ---------------------------------------------------------------- index

    def _open_index(self) -> tuple[VectorIndex, bool]:
        """(index, whether a new snapshot should be written)."""
        path = self.directory / SNAPSHOT_FILE
        try:
            loaded = read_snapshot(path)
        except SnapshotError as exc:
            log.warning("gallery snapshot unusable (%s); rebuilding from the store", exc)
            loaded = None
        if loaded is not None:
            meta, data = loaded
            reason = self._snapshot_mismatch(meta)
            if reason is None:
                try:
                    index = self._replay(meta, data)
                except Exception as exc:  # a snapshot is only an accelerator
                    log.warning("gallery snapshot replay failed (%s); rebuilding", exc)
                else:
                    if index is not None:
                        self._snapshot_version = meta.version
                        replayed = meta.version != self._version
                        self.recovery = "snapshot+replay" if replayed else "snapshot"
                        return index, meta.version != self._version
                    reason = "its exemplars differ from the store's"
            log.info("gallery snapshot not used (%s); rebuilding from the store", reason)
        self.recovery = "rebuild"
        return self._rebuild(), True

    def _snapshot_mismatch(self, meta: SnapshotMeta) -> str | None:
        if meta.space_id != self.space_id:
            return f"made for space {meta.space_id}, now {self.space_id}"
        if meta.dim != self.dim:
            return f"{meta.dim}-d, now {self.dim}-d"
        if meta.version > self._version:
            return f"newer (version {meta.version}) than the store ({self._version})"
        snap = IndexSpec.parse(meta.index_kind)
        want = self.index_spec
        if want.kind == "auto":
            want = want.resolve(self.size + len(self._protos.names), self.dim)
        if snap.kind != want.kind:
            return f"index kind {snap.kind}, configured {want.kind}"
        for key in ("nlist", "pq_m"):
            if getattr(self.index_spec, key) and getattr(snap, key) != getattr(self.index_spec,
                                                                                key):
                return f"{key}={getattr(snap, key)}, configured {getattr(self.index_spec, key)}"
        return None

    def _replay(self, meta: SnapshotMeta, data: np.ndarray) -> VectorIndex | None:
        spec = IndexSpec.parse(meta.index_kind)
        spec = IndexSpec(kind=spec.kind, nlist=spec.nlist, pq_m=spec.pq_m,
                         nprobe=self.index_spec.nprobe)
        index = VectorIndex.from_bytes(data, spec, self.dim)
        events = self.store.events_after(meta.version)
        removed = [e.exemplar_id for e in events if e.kind == "remove"]
        added = [e.exemplar_id for e in events if e.kind == "add"]
        index.remove(removed)
        ids, raw = self.store.embeddings_by_ids(added)
        index.add(ids, self.project(raw))
        if not np.array_equal(index.exemplar_ids(), self.store.all_ids()):
            return None
        log.info("gallery: snapshot v%d loaded, %d later changes replayed", meta.version,
                 len(events))
        return index

    def rebuild_index(self, progress: bool = False) -> int:
        """Retrain and refill the vector index from the store, then snapshot it.

        An IVF index keeps the centroids trained when it was built; this trains
        them on the gallery as it is now (``gallery rebuild``). When the gallery is
        held exclusively, nothing searches it, so the old index is dropped first
        and memory holds one index instead of two. Returns the photos indexed.
        """
        self.settle()  # a snapshot in flight would write the old index after ours
        with self._write_lock:
            if self.exclusive:
                self.index = VectorIndex.build(IndexSpec(), self.dim)
            index = self._rebuild(progress)
            index.set_prototypes(np.arange(len(self._protos.names)), self._protos.vectors)
            self.index = index
            self._snapshot_version = -1
        self.snapshot()
        return index.exemplar_count

    def _rebuild(self, progress: bool | None = None) -> VectorIndex:
        """A new index from the store: IVF trained on a sample, photos added in chunks.
        ``progress`` None: a bar only for large galleries."""
        total = self.store.count()
        training = None
        concrete = self.index_spec.resolve(total + len(self._protos.names), self.dim)
        if concrete.kind != "flat":
            training = self._training_sample(concrete.training_points())
        index = VectorIndex.build(concrete, self.dim, training)
        with tqdm(total=total, desc="gallery index", unit="photo", leave=False,
                  disable=total < 10_000 if progress is None else not progress) as bar:
            for ids, raw in self.store.iter_embeddings(chunk=INDEX_CHUNK):
                index.add(ids, self.project(raw))
                bar.update(len(ids))
        log.info("gallery: index rebuilt from the store (%d photos, %s)", total,
                 index.spec.describe())
        return index

    def _training_sample(self, at_least: int = 0) -> np.ndarray:
        """The prototypes and TRAINING_SAMPLE photos (more if the index needs more to
        train, ``at_least`` vectors): ids are drawn first and only the drawn rows are
        read, into one array filled in place (no second copy of the sample)."""
        protos = self._protos.vectors
        ids = self.store.sample_ids(max(TRAINING_SAMPLE, at_least - len(protos)))
        out = np.empty((len(protos) + len(ids), self.dim), np.float32)
        out[:len(protos)] = protos
        filled = len(protos)
        for start in range(0, len(ids), INDEX_CHUNK):
            _, raw = self.store.embeddings_by_ids(ids[start:start + INDEX_CHUNK].tolist())
            out[filled:filled + len(raw)] = self.project(raw)
            filled += len(raw)
        return out[:filled]  # fewer only if photos were removed since the draw

    # ------------------------------------------------------------ snapshots

    def settle(self) -> None:
        """Wait for a snapshot being written in the background: before a rebuild or a
        close, and where benchmarks time adds apart from it (its cost per add is
        constant: ``_maybe_snapshot``)."""
        thread = self._snapshot_thread
        if thread is not None:
            thread.join()

    def snapshot(self) -> None:
        """Write the index atomically with the version it contains; prune older events."""
        with self._snapshot_lock:
            with self._write_lock:
                version = self._version
                data = self.index.to_bytes()
                count = self.size
            if version == self._snapshot_version:
                return
            meta = SnapshotMeta(version=version, space_id=self.space_id,
                                index_kind=self.index.spec.describe(), dim=self.dim,
                                exemplar_count=count)
            write_snapshot(self.directory / SNAPSHOT_FILE, meta, data)
            self._snapshot_version = version
            self.store.prune_events(version)

    def _maybe_snapshot(self) -> None:
        # Writing a snapshot costs O(gallery) (under the writer lock while it is
        # serialised): taken every SNAPSHOT_SHARE of the gallery's size in changes
        # (at least snapshot_every), that cost stays O(1) per add at any size.
        due = max(self.snapshot_every, int(self.size * SNAPSHOT_SHARE))
        if self._version - max(self._snapshot_version, 0) < due:
            return
        thread = self._snapshot_thread
        if thread is not None and thread.is_alive():
            return
        self._snapshot_thread = threading.Thread(target=self._snapshot_quietly,
                                                 name="gallery-snapshot", daemon=True)
        self._snapshot_thread.start()

    def _snapshot_quietly(self) -> None:
        try:
            self.snapshot()
        except Exception:  # the store is the truth; a failed snapshot only slows a restart
            log.exception("gallery snapshot failed")

    def close(self) -> None:
        if self._closed:
            return
        self._stop_refiner()
        self.settle()
        try:
            self.snapshot()
        except Exception:
            log.exception("gallery snapshot at close failed; the next start replays the store")
        self._closed = True
        self.store.close()
        os.close(self._owner_fd)
