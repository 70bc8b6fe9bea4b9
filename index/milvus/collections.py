"""The Milvus gallery's reads and writes: exemplar rows, species rows, searches, pages.

Everything shared between replicas lives in Milvus, vector and metadata in one
row: an add is one atomic upsert, a search returns its hits' metadata in the
same call, and there is one system to run (why not SQLite or PostgreSQL:
docs/deploy.md). Collections: ``milvus_schema``; row forms: ``milvus_rows``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from biolit_id.index.milvus.caps import probe
from biolit_id.index.milvus.errors import milvus_errors
from biolit_id.index.milvus.rows import (
    MAX_ID,
    SpeciesRow,
    exemplar_row,
    expr_in,
    species_row_dict,
)
from biolit_id.index.milvus.schema import (
    META_KEY,
    check_meta,
    ensure_collections,
    read_meta,
    write_meta,
)
from biolit_id.index.milvus.target import MilvusTarget, connect

log = logging.getLogger(__name__)

QUERY_WINDOW = 4096  # rows one paging query may return before the window shrinks
QUERY_CAP = 16384  # Milvus's largest query result window (limit + offset)
GET_CHUNK = 1000
STRONG = "Strong"  # reads that must see every replica's acknowledged writes
SPECIES_FIELDS = ["species", "version", "count", "ids_digest", "record_json", "created_at",
                  "refined_count"]


class MilvusIndex:
    """The two collections, with the vector-index operations the gallery needs.

    Mirrors ``faiss_index.VectorIndex`` where the notions match
    (``search_exemplars`` -> (scores, ids) padded with -1, ``remove``,
    ``exemplar_ids``, ``exemplar_count``), and adds what FAISS leaves to the
    SQLite store (metadata rows, pages, per-species embeddings). Thread-safe:
    pymilvus clients are; writes of one process are serialised by
    ``write_lock`` (milvus-lite requires serialised writers; on a cluster it
    only orders this replica's).
    """

    def __init__(self, target: MilvusTarget, *, dim: int, raw_dim: int, meta: dict,
                 client=None) -> None:
        self.target = target
        self.dim = int(dim)
        self.raw_dim = int(raw_dim)
        self.name = target.collection
        self.species_name = target.species_collection
        self.client = client if client is not None else connect(target)
        self.write_lock = threading.Lock()
        self.caps = probe(self.client, target.lite)
        self._cl = target.consistency or self.caps.read_consistency  # searches, pages, polls
        ensure_collections(self.client, target, self.dim, self.raw_dim, self.caps)
        self.meta = check_meta(self.client, target, meta, self.dim, self.raw_dim,
                               self.write_lock)

    # -------------------------------------------------------------- writes

    def insert(self, rows: Sequence[dict]) -> None:
        """Upsert whole exemplar rows (see ``exemplar_row``); idempotent per id."""
        if not rows:
            return
        with milvus_errors("upsert"), self.write_lock:
            self.client.upsert(self.name, list(rows))

    def exemplar_row(self, exemplar_id: int, species: str, vector: np.ndarray,
                     raw: np.ndarray, **fields) -> dict:
        return exemplar_row(exemplar_id, species, vector, raw, dim=self.dim,
                            raw_dim=self.raw_dim, **fields)

    def remove(self, ids: Sequence[int]) -> int:
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        with milvus_errors("delete"), self.write_lock:
            self.client.delete(self.name, ids=ids)
        return len(ids)

    def upsert_species(self, row: SpeciesRow) -> None:
        with milvus_errors("upsert (species)"), self.write_lock:
            self.client.upsert(self.species_name, [species_row_dict(row, self.dim)])

    @milvus_errors("flush")
    def flush(self, reload: bool = False) -> None:
        """Seal what was inserted. ``reload``: also release and load the collection.

        Milvus (and milvus-lite) search growing, unsealed data by brute force
        and build the configured index per sealed segment in the background;
        milvus-lite only uses a segment's index once the collection is loaded
        again. Recall measurements need the index in use, so they reload.
        """
        self.client.flush(self.name)
        if reload and self.target.lite:
            self.client.release_collection(self.name)
            self.client.load_collection(self.name)
        elif reload:  # a server hands indexed segments to its query nodes by itself
            self.wait_indexed()

    def wait_indexed(self, timeout: float = 900.0) -> dict:
        """Wait until the server has built the vector index of every sealed row; returns
        ``describe_index``'s counts (benchmarks: search through the index, not growing
        segments)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.client.describe_index(self.name, "vector") or {}
            total, done = int(info.get("total_rows", 0)), int(info.get("indexed_rows", 0))
            if (done >= total and not int(info.get("pending_index_rows", 0))) \
                    or time.monotonic() > deadline:
                return info
            time.sleep(0.5)

    # --------------------------------------------------------------- reads

    def search_exemplars(self, queries: np.ndarray, k: int,
                         only_ids: Sequence[int] | None = None,
                         species: Sequence[str] | None = None, exclude: Sequence[int] = (),
                         output_fields: Sequence[str] = (),
                         search_params: dict | None = None,
                         ) -> tuple[np.ndarray, np.ndarray, list[list[dict]]]:
        """(scores [B, k], ids [B, k] -1 padded, entities per hit) of the nearest exemplars.

        ``search_params`` overrides the target's (nprobe / ef), for recall sweeps.
        """
        x = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(-1, self.dim))
        clauses = []
        if species is not None:
            clauses.append(expr_in("species", species))
        if only_ids is not None:
            clauses.append(expr_in("id", [int(i) for i in only_ids]))
        if exclude:
            clauses.append(f"id not in {json.dumps([int(i) for i in exclude])}")
        with milvus_errors("search"):
            result = self.client.search(
                self.name, data=x.tolist(), anns_field="vector", limit=int(k),
                filter=" and ".join(clauses), output_fields=list(output_fields),
                search_params={"metric_type": "IP",
                               "params": search_params or self.target.search_params()},
                consistency_level=self._cl,
            )
        scores = np.zeros((len(x), k), np.float32)
        ids = np.full((len(x), k), -1, np.int64)
        entities: list[list[dict]] = []
        for b, hits in enumerate(result):
            row = []
            for j, hit in enumerate(list(hits)[:k]):
                ids[b, j] = int(hit["id"])
                scores[b, j] = float(hit["distance"])
                row.append(dict(hit.get("entity") or {}))
            entities.append(row)
        return scores, ids, entities

    def get(self, ids: Sequence[int], fields: Sequence[str],
            fresh: bool = True, level: str | None = None) -> dict[int, dict]:
        """Rows by id. ``fresh``: as every replica wrote them (Strong); else at the read
        level (this replica's writes are seen, another's within a time tick);
        ``level``: that consistency level instead."""
        ids = [int(i) for i in ids]
        out: dict[int, dict] = {}
        level = level or (STRONG if fresh else self._cl)
        for start in range(0, len(ids), GET_CHUNK):
            with milvus_errors("get"):
                rows = self.client.get(self.name, ids=ids[start:start + GET_CHUNK],
                                       output_fields=list(fields), consistency_level=level)
            out.update((int(r["id"]), r) for r in rows)
        return out

    def query(self, expr: str, fields: Sequence[str], limit: int,
              collection: str | None = None, fresh: bool = False) -> list[dict]:
        """One plain query (at most ``limit`` rows, in no particular order); ``fresh``:
        Strong, else at the read level (see ``get``)."""
        with milvus_errors("query"):
            return self.client.query(collection or self.name, filter=expr,
                                     output_fields=list(fields), limit=int(limit),
                                     consistency_level=STRONG if fresh else self._cl)

    def iter_rows(self, fields: Sequence[str], expr: str = "",
                  batch: int = 1000, fresh: bool = True) -> Iterator[list[dict]]:
        """Every row matching ``expr`` in batches (no result cap)."""
        yield from self._query_all(self.name, expr or "id >= 0",
                                   ["id", *[f for f in fields if f != "id"]], batch, fresh)

    def _query_all(self, collection: str, expr: str, fields: list[str],
                   batch: int = 1000, fresh: bool = False) -> Iterator[list[dict]]:
        """One plain query when the answer fits Milvus's result window, else an iterator.

        The common case (one species, the species rows) is one round trip;
        the iterator, which pages through anything, is kept for big answers.
        """
        rows = self.query(expr, fields, QUERY_CAP, collection, fresh)
        if len(rows) < QUERY_CAP:
            if rows:
                yield rows
            return
        with milvus_errors("query"):
            iterator = self.client.query_iterator(collection, batch_size=batch, filter=expr,
                                                  output_fields=fields)
        try:
            while True:
                with milvus_errors("query"):
                    rows = iterator.next()
                if not rows:
                    return
                yield rows
        finally:
            iterator.close()

    def embeddings_for(self, species: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n], raw [n, D]) of one species, in id order (deterministic prototypes)."""
        ids: list[int] = []
        raws: list = []
        for rows in self.iter_rows(["raw"], expr_in("species", [species])):
            ids.extend(int(r["id"]) for r in rows)
            raws.extend(r["raw"] for r in rows)
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, self.raw_dim), np.float32)
        order = np.argsort(np.asarray(ids, np.int64), kind="stable")
        return (np.asarray(ids, np.int64)[order],
                np.asarray(raws, dtype=np.float32).reshape(len(ids), self.raw_dim)[order])

    def find_content(self, species: str, content_sha256: str) -> int | None:
        """The id of this photo of this species, whatever its id (imported ids are not
        ``exemplar_id_for``'s); the smallest when several."""
        expr = (f"species == {json.dumps(species)} and "
                f"content_sha256 == {json.dumps(content_sha256)}")
        rows = self.query(expr, ["id"], 16)
        return min((int(r["id"]) for r in rows), default=None)

    def species_without_rows(self, known: Sequence[str]) -> list[str]:
        """Species with exemplars but not in ``known`` (the species rows): one query
        when there are none, as there should be; one more per name found."""
        names, found = list(known), []
        while True:
            expr = f"species not in {json.dumps(names)}" if names else "id >= 0"
            new = list(dict.fromkeys(r["species"] for r in self.query(expr, ["species"], 1000)))
            if not new:
                return found
            found += new
            names += new

    def ids_for(self, species: str) -> np.ndarray:
        ids = [int(r["id"]) for rows in self.iter_rows([], expr_in("species", [species]))
               for r in rows]
        return np.sort(np.asarray(ids, np.int64))

    def exemplar_ids(self) -> np.ndarray:
        """Every exemplar id (sorted); O(N), for checks and exports."""
        ids = [int(r["id"]) for rows in self.iter_rows([]) for r in rows]
        return np.sort(np.asarray(ids, np.int64))

    @property
    def exemplar_count(self) -> int:
        return self.count()

    def count(self, species: Sequence[str] | None = None) -> int:
        expr = "" if species is None else expr_in("species", species)
        with milvus_errors("count"):
            rows = self.client.query(self.name, filter=expr, output_fields=["count(*)"],
                                     consistency_level=self._cl)
        return int(rows[0]["count(*)"])

    def page_ids(self, after_id: int, limit: int, species: Sequence[str] | None) -> list[int]:
        """The ``limit`` smallest ids above ``after_id`` (optionally of some species).

        Milvus returns query rows in no particular order, so ``id > after
        LIMIT n`` is not a page. Instead, scan primary-key windows upwards,
        widening them while they are sparse and narrowing them when one holds
        more than ``QUERY_WINDOW`` rows, and sort each window: every id in a
        window is seen, so pages never skip or repeat a row.
        """
        found: list[int] = []
        lo, width = int(after_id), 1 << 16
        where = f" and {expr_in('species', species)}" if species is not None else ""
        while len(found) < limit and lo < MAX_ID:
            hi = min(lo + width, MAX_ID)
            rows = self.query(f"id > {lo} and id <= {hi}{where}", ["id"], QUERY_WINDOW + 1)
            if len(rows) > QUERY_WINDOW and width > 1:
                width = max(1, width // 8)
                continue
            found.extend(sorted(int(r["id"]) for r in rows))
            lo = hi
            if len(rows) < limit:
                width = min(width * 8, MAX_ID)
        return found[:limit]

    def species_rows(self, since_version: int | None = None,
                     names: Sequence[str] | None = None,
                     with_vectors: bool = False, fresh: bool = False) -> list[SpeciesRow]:
        """Species rows (never ``#meta``); ``with_vectors``: also prototype and sums.
        ``fresh``: as every replica wrote them (Strong), else at the read level."""
        fields = SPECIES_FIELDS + (["vector", "total"] if with_vectors else [])
        clauses = [f"species != {json.dumps(META_KEY)}"]
        if since_version is not None:
            clauses.append(f"version >= {int(since_version)}")
        if names is not None:
            if not names:
                return []
            clauses.append(expr_in("species", names))
        return [_species_row(r) for rows in self._query_all(
            self.species_name, " and ".join(clauses), fields, 2000, fresh) for r in rows]

    def species_row(self, name: str) -> SpeciesRow | None:
        """One species' row with its sums, by primary key (no scan), as last written."""
        return self.species_rows_by_key([name]).get(name)

    def species_rows_by_key(self, names: Sequence[str]) -> dict[str, SpeciesRow]:
        """These species' rows with their sums, by primary key, as last written by any
        replica (Strong: one wait for the server's time tick for all of them)."""
        if not names:
            return {}
        with milvus_errors("get (species)"):
            rows = self.client.get(self.species_name, ids=list(names),
                                   output_fields=[*SPECIES_FIELDS, "vector", "total"],
                                   consistency_level=STRONG)
        return {r["species"]: _species_row(r) for r in rows}

    def reload_meta(self) -> dict:
        """The ``#meta`` row as stored now (another process may have updated it)."""
        self.meta = read_meta(self.client, self.species_name) or self.meta
        return self.meta

    def update_meta(self, **values) -> None:
        self.meta = dict(self.reload_meta(), **values)
        write_meta(self.client, self.target, self.meta, self.dim, self.write_lock)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing must never mask the reason we are shutting down
            log.debug("Milvus client close failed", exc_info=True)


def _species_row(r: dict) -> SpeciesRow:
    vector = np.asarray(r["vector"], np.float32) if "vector" in r else np.zeros(0, np.float32)
    total = np.asarray(r["total"], np.float64) if r.get("total") is not None else None
    return SpeciesRow(r["species"], vector, int(r["version"]), int(r["count"]), r["ids_digest"],
                      r["record_json"], float(r["created_at"]), total,
                      int(r.get("refined_count") or 0))
