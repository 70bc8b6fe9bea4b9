"""The gallery on Milvus: stateless replicas sharing one gallery, prototypes in memory.

Exemplars live in Milvus only, so any replica adds, searches, lists or removes
any photo and a crash loses nothing. Each species' prototype state (running
sums, ``prototypes.SpeciesSums``) lives in its species row: an add reads that
row by key and writes it back with the photo's contribution, so it costs the
same at 10 photos or 10 million, and every replica computes the same fused
prototype from the sums with its own bundle. Replicas poll the species rows
for changed version stamps (``time_ns``: Milvus has no atomic counter).

Milvus has no transaction over the photo and its species row. The check that
replaces one is cheap: the species rows' counts must add up to the photos
Milvus holds. Only a disagreement that outlives a whole sweep with no write to
that species in between (an interrupted add, two replicas racing on one row)
is repaired, by recomputing the species from its photos. How replicas stay
in step, and the settings: docs/deploy.md.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from biolit_id.index.base import (
    AddOutcome,
    GalleryBase,
    GalleryError,
    GallerySpace,
    RemoveOutcome,
    SpeciesExistsError,
    UnknownExemplarError,
    UnknownSpeciesError,
    similar_hit,
)
from biolit_id.index.core.catalog_view import CatalogView, SpeciesRecordView
from biolit_id.index.core.types import PrototypeSet, SimilarHit
from biolit_id.index.core.vectors import l2_normalize64
from biolit_id.index.milvus.collections import MilvusIndex
from biolit_id.index.milvus.rows import (
    EXEMPLAR_META_FIELDS,
    SpeciesRow,
    exemplar_id_for,
    ids_checksum,
    state_digest,
)
from biolit_id.index.milvus.target import MilvusTarget
from biolit_id.index.milvus.thumbnail import decode_thumbnail
from biolit_id.index.prototypes import PrototypeBuilder, SpeciesSums
from biolit_id.index.store import ExemplarRow, NewExemplar

log = logging.getLogger(__name__)

SKEW_MARGIN_NS = 30 * 10**9  # incremental polls re-read this much before the newest stamp
RECENT_S = 30.0  # this replica's own writes, remembered for the duplicate check (server)
LITE_FLUSH_EVERY = 2000  # photos written before milvus-lite is asked to seal them


@dataclass
class _Delta:
    """Photos stored but not yet folded into their species row (one stream's worth)."""

    total: np.ndarray
    count: int = 0
    checksum: int = 0
    since: float = field(default_factory=time.monotonic)  # the first photo's, for the poller

    def add(self, vector: np.ndarray, exemplar_id: int, sign: int = 1) -> None:
        self.total += sign * l2_normalize64(np.asarray(vector, np.float64))
        self.count += sign
        self.checksum = ids_checksum([exemplar_id], self.checksum)


class MilvusGallery(GalleryBase):
    backend = "milvus"

    def __init__(
        self,
        target: MilvusTarget,
        *,
        catalog: CatalogView,
        builder: PrototypeBuilder,
        space: GallerySpace,
        index: MilvusIndex | None = None,
    ) -> None:
        super().__init__(catalog=catalog, builder=builder, space=space)
        self.target = target
        self.raw_dim = int(space.embedding_dim)
        self.index = index or MilvusIndex(
            target, dim=self.dim, raw_dim=space.embedding_dim,
            meta={"model_fingerprint": space.model_fingerprint, "space_id": space.space_id,
                  "legacy_space_id": builder.source},
        )
        self._stamps: dict[str, int] = {}
        self._checksums: dict[str, int] = {}
        self._records: dict[str, str] = {}  # runtime species: catalog record JSON
        self._created: dict[str, float] = {}
        self._pending: dict[str, _Delta] = {}
        self._suspects: dict[str, tuple[int | None, int]] = {}
        self._unflushed = 0
        self._recent: dict[int, tuple[float, str | None, str | None]] = {}  # _lookup_for_add
        self.recovery = "milvus"
        self.syncs = 0  # polls that installed changes (logs, tests)
        self.repairs = 0  # species recomputed because their row disagreed with Milvus
        self.sweeps = 0  # full syncs done
        base = PrototypeSet(tuple(builder.base_names),
                            np.ascontiguousarray(builder.base_vectors, np.float32), version=0)
        self._publish(base)
        rows = self.index.species_rows(with_vectors=True)
        with self._write_lock:
            self._apply(rows, initial=True)
        self.reconcile(rows, at_start=True)
        self._last_sweep = time.monotonic()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if target.poll_seconds > 0:
            self._poller = threading.Thread(target=self._poll_loop, name="gallery-sync",
                                            daemon=True)
            self._poller.start()
        self.start_refiner(target.refine_seconds)
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
        scores, ids, entities = self.index.search_exemplars(
            queries, k, species=None if species is None else list(species),
            exclude=list(exclude), output_fields=fields)
        return [
            [similar_hit(_row({**e, "id": vid}), float(score))
             for score, vid, e in zip(row_scores, row_ids, row_entities, strict=False)
             if vid >= 0]
            for row_scores, row_ids, row_entities in zip(scores, ids, entities, strict=True)
        ]

    def settle(self) -> None:
        """Seal what was written and reload: milvus-lite searches a sealed segment
        through its vector index only after a load."""
        self.index.flush(reload=True)

    def embedding_of(self, exemplar_id: int) -> np.ndarray:
        found = self.index.get([exemplar_id], ["raw"]).get(int(exemplar_id))
        if found is None:
            raise UnknownExemplarError([exemplar_id])
        return np.asarray(found["raw"], dtype=np.float32)

    def list_exemplars(self, species: Sequence[str] | None, after_id: int, limit: int,
                       include_thumbnails: bool = False) -> tuple[list[ExemplarRow], int]:
        ids = self.index.page_ids(after_id, limit, None if species is None else list(species))
        fields = list(EXEMPLAR_META_FIELDS) + (["thumbnail"] if include_thumbnails else [])
        got = self.index.get(ids, fields, fresh=False)  # ids just paged at the same level
        rows = [_row(got[i]) for i in ids if i in got]
        # From Milvus, not the local counts: those lag other replicas' writes by a poll.
        return rows, self.index.count(None if species is None else list(species))

    def find(self, species: str, content_sha256: str) -> int | None:
        """The stored photo's id: a key lookup, plus a content query only in a collection
        that holds imported ids (``gallery import`` keeps a FAISS gallery's ids)."""
        eid = exemplar_id_for(species, content_sha256)
        found = self.index.get([eid], ["species", "content_sha256"], fresh=False).get(eid)
        if found is not None and (found["species"], found["content_sha256"]) == (
                species, content_sha256):
            return eid
        if self.index.meta.get("imported_ids"):
            return self.index.find_content(species, content_sha256)
        return None

    # ----------------------------------------------------------- write API

    def add_exemplar(self, item: NewExemplar, refresh: bool = True) -> AddOutcome:
        """Store the photo; its species row takes it at ``refresh`` (the end of a stream).

        One key lookup and one upsert: nothing here reads the species' photos.
        """
        self._check_open()
        with self._write_lock:
            outcome = self._add_locked([item])[0]
            if refresh and outcome.created:
                self._refresh_locked([item.species])
        return outcome

    def add_many(self, items: Sequence[NewExemplar]) -> list[AddOutcome]:
        """One key lookup and one upsert for the batch, then its species rows.

        On a Milvus server the species rows are written at the next ``refresh``
        (a stream's end: before its acknowledgement), or by the sync thread
        within ``poll`` seconds, or at ``close``; this replica's prototypes
        take the photos at once. Reading a species row to write it back must
        see every replica's writes (a Strong read: one server time tick,
        200 ms by default), so one per stream instead of one per batch is what
        lets a stream add more than a few hundred photos a second. A replica
        killed before the write leaves photos without their rows: repaired at
        the next start of any replica or within two sweeps, as any
        interrupted add is.
        """
        self._check_open()
        with self._write_lock:
            outcomes = self._add_locked(items)
            touched = list(dict.fromkeys(o.species for o in outcomes if o.created))
            if self.target.lite:  # no time tick to wait for: write the rows now
                self._refresh_locked(touched)
            else:
                self._publish_pending_locked(touched)
        return outcomes

    def _publish_pending_locked(self, species: Sequence[str]) -> None:
        """This replica's prototypes and counts with the pending photos, rows unwritten."""
        updates, counts = [], dict(self._counts)
        for name in species:
            delta = self._pending.get(name)
            if delta is None:
                continue
            sums = self._sums_of(name).shifted(delta.total, delta.count)
            counts[name] = sums.count
            if name in self.catalog or name in self._row_of:
                updates.append((name, self.builder.fused_from_sums(name, sums)))
        self._counts = counts
        if updates:
            self._publish(self._updated_prototypes(updates)[0])

    def commit_pending(self, older_than: float = 0.0) -> list[str]:
        """Write the species rows of photos still pending for ``older_than`` seconds."""
        now = time.monotonic()
        with self._write_lock:
            due = [n for n, d in self._pending.items() if now - d.since >= older_than]
            self._commit_locked(due)
        return due

    def _add_locked(self, items: Sequence[NewExemplar]) -> list[AddOutcome]:
        for item in items:
            if not self.knows(item.species):
                raise UnknownSpeciesError(item.species)
        ids = [exemplar_id_for(i.species, i.content_sha256) for i in items]
        found = self._lookup_for_add(ids)
        stored: dict[tuple[str, str], int] = {}  # photo -> its id, new ones included
        new: list[int] = []
        for pos, (eid, item) in enumerate(zip(ids, items, strict=True)):
            key = (item.species, item.content_sha256)
            if key not in stored:
                existing = self._stored_id(eid, item, found.get(eid))
                if existing is None:
                    new.append(pos)
                stored[key] = eid if existing is None else existing
        if new:
            self._insert_locked([items[p] for p in new], [ids[p] for p in new])
        created = set(new)
        return [AddOutcome(stored[(item.species, item.content_sha256)], pos in created,
                           item.species) for pos, item in enumerate(items)]

    def _lookup_for_add(self, ids: Sequence[int]) -> dict[int, dict]:
        """Which of these ids are stored, for the duplicate check before an add.

        milvus-lite: a plain read. A server: a read that waits for no time tick
        (``Eventually``; even a ``Session`` read waits one after this replica's
        own last write, 200 ms per batch), corrected by what this replica wrote
        or removed in the last ``RECENT_S`` seconds, so its own writes are
        always seen. A photo sent through another replica less than a time tick
        before may be missed: it is upserted again (same id, one row) and counted
        twice in its species row until the consistency check repairs it.
        ``consistency=strong`` in the URI makes the check exact, at one time tick
        per batch.
        """
        fields = ["species", "content_sha256"]
        if self.target.lite or self.target.consistency == "Strong":
            return self.index.get(ids, fields)
        found = self.index.get(ids, fields, level="Eventually")
        now = time.monotonic()
        self._recent = {i: v for i, v in self._recent.items() if now - v[0] < RECENT_S}
        for eid in ids:
            mine = self._recent.get(int(eid))
            if mine is None:
                continue
            if mine[1] is None:  # removed through this replica
                found.pop(int(eid), None)
            else:
                found[int(eid)] = {"id": int(eid), "species": mine[1], "content_sha256": mine[2]}
        return found

    def _stored_id(self, eid: int, item: NewExemplar, found: dict | None) -> int | None:
        """The id this photo is already stored under, or None; a foreign row under its
        id (a hash collision) is refused rather than overwritten."""
        if found is not None and (found["species"], found["content_sha256"]) == (
                item.species, item.content_sha256):
            return eid
        if self.index.meta.get("imported_ids"):  # `gallery import` kept a FAISS gallery's ids
            imported = self.index.find_content(item.species, item.content_sha256)
            if imported is not None:
                return imported
        if found is not None:
            raise GalleryError(
                f"exemplar id {eid} already belongs to another photo (a 62-bit hash "
                "collision, about 1 in 10^11 per pair); re-encode the photo to add it")
        return None

    def _insert_locked(self, items: Sequence[NewExemplar], ids: Sequence[int]) -> None:
        raw = np.stack([np.asarray(i.embedding, np.float32).reshape(self.raw_dim)
                        for i in items])
        projected = self.project(raw)
        now = time.time()
        try:
            rows = [self.index.exemplar_row(
                eid, item.species, vec, r, content_sha256=item.content_sha256,
                added_at=now, thumbnail=item.thumbnail, **item.meta_dict())
                for eid, item, vec, r in zip(ids, items, projected, raw, strict=True)]
        except ValueError as exc:
            raise GalleryError(f"cannot store this exemplar: {exc}") from exc
        self.index.insert(rows)
        now = time.monotonic()
        for eid, item, vec in zip(ids, items, projected, strict=True):
            self._delta(item.species).add(vec, eid)
            self._recent[int(eid)] = (now, item.species, item.content_sha256)

    def remove(self, ids: Sequence[int]) -> RemoveOutcome:
        self._check_open()
        wanted = sorted({int(i) for i in ids})
        with self._write_lock:
            found = self.index.get(wanted, ["species", "vector"])
            missing = [i for i in wanted if i not in found]
            if missing:
                raise UnknownExemplarError(missing)
            self.index.remove(wanted)
            now = time.monotonic()
            self._recent.update((i, (now, None, None)) for i in wanted)
            for i in wanted:
                self._delta(found[i]["species"]).add(found[i]["vector"], i, sign=-1)
            species = list(dict.fromkeys(found[i]["species"] for i in wanted))
            self._refresh_locked(species)
        return RemoveOutcome(len(wanted), species, self._version)

    def add_species(self, record: SpeciesRecordView) -> None:
        self._check_open()
        name = record.scientific_name
        with self._write_lock:
            shared = self.index.species_rows(names=[name], with_vectors=True, fresh=True)
            if shared:  # added through another replica since our last poll
                self._apply(shared)
            if self.knows(name):
                raise SpeciesExistsError(f"species {name!r} already exists")
            self._records[name] = json.dumps(record.to_json())
            self._created[name] = time.time()
            self.catalog.add(record)
            self._commit_locked([name])

    def import_rows(self, rows: Iterable[dict]) -> int:
        """Store exported exemplar rows (ids kept) without refreshing; returns the count.

        Each row: id, species, embedding (raw), content_sha256, source_uri,
        observation_id, license, contributor, added_at, thumbnail (bytes).
        Upserts, so a re-run of an interrupted import is harmless (pass only
        rows not stored yet: their sums are counted). Call ``refresh`` with the
        species afterwards.
        """
        self._check_open()
        batch = [(r, np.asarray(r["embedding"], dtype=np.float32).reshape(self.raw_dim))
                 for r in rows]
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
        foreign = any(int(r["id"]) != exemplar_id_for(r["species"], r["content_sha256"])
                      for r, _ in batch)
        with self._write_lock:
            if foreign and not self.index.meta.get("imported_ids"):
                self.index.update_meta(imported_ids=True)  # before the rows: find() sees them
            self.index.insert(milvus_rows)
            for (r, _), vec in zip(batch, projected, strict=True):
                self._delta(r["species"]).add(vec, int(r["id"]))
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
        repaired: list[str] = []
        if full:
            self.sweeps += 1
            self.index.reload_meta()  # an import may have started meanwhile
            repaired = self.reconcile(rows)
        return len(fresh) + len(repaired)

    def reconcile(self, rows: Sequence[SpeciesRow] | None = None,
                  at_start: bool = False) -> list[str]:
        """Recompute species whose row disagrees with the photos Milvus holds; their names.

        One count query when all is well (the rows' counts add up to the
        photos); per-species counts only when they do not. At start every
        disagreement is repaired; in a sweep only one seen unchanged (same
        row version, same photo count) by the previous sweep too, so a
        stream still being written by another replica is never "repaired".
        """
        rows = list(self.index.species_rows() if rows is None else rows)
        with self._write_lock:
            pending = {n: d.count for n, d in self._pending.items()}
        expected = sum(r.count for r in rows) + sum(pending.values())
        if expected == self.index.count():
            self._suspects = {}
            return []
        wrong: dict[str, tuple[int | None, int]] = {}
        for r in rows:
            have = self.index.count([r.species])
            if have != r.count + pending.get(r.species, 0):
                wrong[r.species] = (r.version, have)
        for name in self.index.species_without_rows([r.species for r in rows]):
            wrong[name] = (None, self.index.count([name]))
        if at_start:
            repair = list(wrong)
        else:
            repair = [n for n, seen in wrong.items() if self._suspects.get(n) == seen]
            self._suspects = {n: seen for n, seen in wrong.items() if n not in repair}
        unknown = [n for n in repair if not self.knows(n)]  # _apply warns about these
        repair = [n for n in repair if n not in unknown]
        if repair:
            log.info("gallery: %d species prototype(s) disagree with the photos Milvus holds "
                     "(an interrupted write, or two replicas writing one species); "
                     "recomputing %s", len(repair), repair[:10])
            with self._write_lock:
                for name in repair:
                    self._pending.pop(name, None)
                self._refine_locked(repair)
            self.repairs += len(repair)
        return repair

    def _poll_loop(self) -> None:
        failures = 0
        while not self._stop.wait(self.target.poll_seconds):
            try:
                if self._pending:  # bulk adds with no stream end (see add_many)
                    self.commit_pending(older_than=self.target.poll_seconds)
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

    def _delta(self, name: str) -> _Delta:
        delta = self._pending.get(name)
        if delta is None:
            delta = self._pending[name] = _Delta(np.zeros(self.dim, np.float64))
        return delta

    def _next_version(self) -> int:
        return max(time.time_ns(), self._version + 1)

    def _refresh_locked(self, species: Sequence[str]) -> None:
        """Fold pending photos into their species rows (write lock held); O(1) per species."""
        todo = [n for n in dict.fromkeys(species) if n in self._pending or n not in self._stamps]
        self._commit_locked(todo)

    def _commit_locked(self, species: Sequence[str]) -> None:
        """Write each species' row: the row as Milvus has it now (another replica may have
        written it) plus our pending photos. A read by key and an upsert, no photo read."""
        written = []
        shared = self.index.species_rows_by_key(species)  # one read for the whole stream
        for name in species:
            delta = self._pending.pop(name, None)
            remote = shared.get(name)
            sums = remote.sums(self.dim) if remote is not None else self._sums_of(name)
            checksum = remote.checksum if remote is not None else 0
            if delta is not None:
                sums = sums.shifted(delta.total, delta.count)
                checksum ^= delta.checksum
            written.append(self._write_row(name, sums, checksum))
            self._unflushed += abs(delta.count) if delta is not None else 0
        self._apply(written)
        if self.target.lite and self._unflushed >= LITE_FLUSH_EVERY:
            # milvus-lite scans unsealed rows in Python on every search and query:
            # sealing them often keeps that part small. A cluster seals by itself.
            self.index.flush()
            self._unflushed = 0

    def _refine_locked(self, species: Sequence[str]) -> None:
        """Recompute these species' state from all their photos (reads them)."""
        written = []
        for name in species:
            ids, raw = self.index.embeddings_for(name)
            self._pending.pop(name, None)
            written.append(self._write_row(name, self.builder.refined_sums(self.project(raw)),
                                           ids_checksum(ids)))
        self._apply(written)

    def _write_row(self, name: str, sums: SpeciesSums, checksum: int) -> SpeciesRow:
        row = SpeciesRow(name, self.builder.fused_from_sums(name, sums), self._next_version(),
                         sums.count, state_digest(checksum, self.builder.source),
                         self._records.get(name, ""),
                         self._created.setdefault(name, time.time()), sums.total,
                         sums.refined_count)
        self.index.upsert_species(row)
        self._version = max(self._version, row.version)
        return row

    def _sums_of(self, name: str) -> SpeciesSums:
        return self._sums.get(name) or SpeciesSums.empty(self.dim)

    def _apply(self, rows: Sequence[SpeciesRow], initial: bool = False) -> None:
        """Install species rows (write lock held): catalog, sums, prototypes, counts, stamps.

        The fused prototype is computed here from the row's sums with this
        replica's own bundle, so rows written by another bundle's replica (a
        rolling upgrade) need no photo read either.
        """
        updates: list[tuple[str, np.ndarray]] = []
        counts = dict(self._counts)
        for r in sorted(rows, key=lambda r: (r.created_at, r.species)):
            if r.record_json and r.species not in self.catalog:
                self.catalog.add(self.catalog.record_from_json(json.loads(r.record_json)))
            if r.record_json:
                self._records[r.species] = r.record_json
            self._created.setdefault(r.species, r.created_at)
            self._stamps[r.species] = r.version
            self._checksums[r.species] = r.checksum
            self._version = max(self._version, r.version)
            sums = r.sums(self.dim)
            self._sums[r.species] = sums
            if r.count:
                counts[r.species] = r.count
            else:
                counts.pop(r.species, None)
            if r.species not in self.catalog and r.species not in self._row_of:
                log.warning("gallery: %d photos of %r, which is in neither catalog nor bundle; "
                            "they are searchable but give no prototype", r.count, r.species)
                continue
            updates.append((r.species, self.builder.fused_from_sums(r.species, sums)))
        self._counts = counts
        self._publish(self._updated_prototypes(updates)[0])
        if initial:
            log.debug("installed %d species rows from Milvus", len(rows))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._stop_refiner()
        if self._poller is not None:
            self._poller.join(timeout=max(5.0, 2 * self.target.poll_seconds))
        with self._write_lock:
            if self._pending:
                try:
                    self._commit_locked(list(self._pending))
                except Exception as exc:  # Milvus away: the consistency check repairs them
                    log.warning("gallery: species rows of %d species not written at close "
                                "(%s); the next start repairs them", len(self._pending), exc)
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
