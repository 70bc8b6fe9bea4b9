"""The gallery's source of truth: one SQLite file in WAL mode.

SQLite because one file gives transactions and, with ``synchronous=FULL``, an
acknowledged add survives ``kill -9``. Rows keep the RAW embedding so the
index can be rebuilt for any bundle; the event log lets a restart replay only
what a snapshot lacks. Tables: docs/gallery.md ("The store").
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biolit_id.index.core.exemplar import META_FIELDS, ExemplarMeta
from biolit_id.index.prototypes import SpeciesSums

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS exemplars (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    species TEXT NOT NULL,
    embedding BLOB NOT NULL,
    source_uri TEXT NOT NULL DEFAULT '',
    thumbnail BLOB NOT NULL DEFAULT x'',
    observation_id TEXT NOT NULL DEFAULT '',
    license TEXT NOT NULL DEFAULT '',
    contributor TEXT NOT NULL DEFAULT '',
    added_at REAL NOT NULL,
    content_sha256 TEXT NOT NULL,
    UNIQUE (species, content_sha256)
);
CREATE INDEX IF NOT EXISTS exemplars_by_species ON exemplars (species, id);
CREATE TABLE IF NOT EXISTS species (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    record_json TEXT NOT NULL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS prototype_rows (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS species_sums (
    name TEXT PRIMARY KEY,
    space_id TEXT NOT NULL,
    count INTEGER NOT NULL,
    total BLOB NOT NULL,
    refined_count INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('add', 'remove', 'species')),
    exemplar_id INTEGER,
    species TEXT NOT NULL
);
"""

META_COLUMNS = f"id, species, {', '.join(META_FIELDS)}, added_at, content_sha256"


class StoreError(RuntimeError):
    """The store cannot be used as it is; the message says why."""


@dataclass(frozen=True)
class ExemplarRow(ExemplarMeta):
    """An exemplar's metadata (the embedding stays in the store)."""

    exemplar_id: int
    species: str
    added_at: float
    content_sha256: str
    thumbnail: bytes = b""


@dataclass(frozen=True)
class NewExemplar(ExemplarMeta):
    species: str
    embedding: np.ndarray  # raw, L2-normalised, [D]
    content_sha256: str
    thumbnail: bytes = b""


@dataclass(frozen=True)
class Event:
    version: int
    kind: str
    exemplar_id: int | None
    species: str


def _row(values: Sequence, thumbnail: bytes = b"") -> ExemplarRow:
    n = len(META_FIELDS)  # values are in META_COLUMNS order
    return ExemplarRow(
        exemplar_id=int(values[0]),
        species=values[1],
        added_at=float(values[2 + n]),
        content_sha256=values[3 + n],
        thumbnail=bytes(thumbnail or b""),
        **dict(zip(META_FIELDS, values[2 : 2 + n], strict=True)),
    )


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def lock_store(path: Path, exclusive: bool = False) -> int:
    """Hold ``<store>.lock`` (flock; released when the fd closes or the process dies).

    Every process with the store open holds it shared; ``gallery restore`` takes
    it exclusive, so a file is never swapped under a running server or tool.
    """
    fd = os.open(Path(path).with_name(Path(path).name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"the gallery store {path} is in use by another process "
                         f"(a running server or tool); stop it first") from None
    return fd


def _corrupt_message(path: Path, reason: str) -> str:
    return (f"the gallery store {path} is corrupt ({reason}); the service will not start on "
            "it. Restore it from a backup (biolit-id gallery restore), see docs/operations.md")


def _check_not_corrupt(conn: sqlite3.Connection, path: Path) -> None:
    """SQLite's quick_check (every page and index, not row contents), once at open: a
    damaged store must stop the start, not answer wrongly later."""
    problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
    if problems != ["ok"]:
        raise StoreError(_corrupt_message(path, "; ".join(problems)))


class GalleryStore:
    def __init__(self, path: Path, model_fingerprint: str, embedding_dim: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.embedding_dim = embedding_dim
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._lock_fd = lock_store(self.path)
        try:
            self._writer = self._connect()
            _check_not_corrupt(self._writer, self.path)
            self._writer.executescript(SCHEMA)
            self._check_model(model_fingerprint, embedding_dim)
        except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"...
            os.close(self._lock_fd)
            raise StoreError(_corrupt_message(self.path, str(exc))) from None
        except BaseException:
            os.close(self._lock_fd)
            raise

    @classmethod
    def open_existing(cls, path: Path) -> GalleryStore:
        """Open a store made by any model (export, inspection): its own meta says which."""
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"no gallery store at {path}")
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            raise StoreError(_corrupt_message(path, str(exc))) from None
        if "model_fingerprint" not in meta:
            raise StoreError(f"{path} is not a gallery store (no model recorded)")
        return cls(path, meta["model_fingerprint"], int(meta["embedding_dim"]))

    def model(self) -> tuple[str, int]:
        """(model fingerprint, embedding size) the stored vectors belong to."""
        rows = dict(self._reader().execute("SELECT key, value FROM meta").fetchall())
        return rows["model_fingerprint"], int(rows["embedding_dim"])

    # ---------------------------------------------------------- connections

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced on every commit, so an acknowledged add survives
        # a power cut, not only a process crash (NORMAL would only survive the latter).
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("the gallery store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        with self._write_lock:
            self._writer.close()
        os.close(self._lock_fd)

    def _check_model(self, fingerprint: str, dim: int) -> None:
        rows = dict(self._writer.execute("SELECT key, value FROM meta").fetchall())
        if not rows:
            with self._transaction() as conn:
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("model_fingerprint", fingerprint), ("embedding_dim", str(dim)),
                     ("created_at", str(time.time()))],
                )
            return
        if rows.get("model_fingerprint") != fingerprint or rows.get("embedding_dim") != str(dim):
            raise StoreError(
                f"the gallery in {self.path.parent} holds embeddings of another model "
                f"(fingerprint {rows.get('model_fingerprint')}, {rows.get('embedding_dim')}-d); "
                f"the loaded model is {fingerprint} ({dim}-d). Its vectors would score garbage: "
                "use another --data-dir for this model, or re-import the photos into it."
            )

    class _Tx:
        def __init__(self, store: GalleryStore) -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._write_lock.acquire()
            if self.store._closed:
                self.store._write_lock.release()
                raise StoreError("the gallery store is closed")
            self.store._writer.execute("BEGIN IMMEDIATE")
            return self.store._writer

        def __exit__(self, exc_type, exc, tb) -> None:
            writer = self.store._writer
            try:
                if exc_type is None:
                    writer.execute("COMMIT")
                elif writer.in_transaction:  # SQLite may have rolled back already (disk full)
                    writer.execute("ROLLBACK")
            except sqlite3.Error:
                # A COMMIT refused by a full disk can leave the transaction open: end it,
                # or every later write would fail until a restart.
                if writer.in_transaction:
                    writer.execute("ROLLBACK")
                raise
            finally:
                self.store._write_lock.release()

    def _transaction(self) -> GalleryStore._Tx:
        return GalleryStore._Tx(self)

    # --------------------------------------------------------------- writes

    def insert_exemplar(self, item: NewExemplar, new_prototype_row: bool,
                        sums: SpeciesSums | None = None,
                        space_id: str = "") -> tuple[int, bool, int]:
        """(id, created, version). An existing (species, content) pair returns its id.

        ``sums``: the species' prototype state with this photo in it, written in
        the same transaction when the photo is new (so the two never disagree).
        """
        (outcome,), version = self.insert_exemplars(
            [item], {item.species} if new_prototype_row else (),
            {item.species: sums} if sums is not None else None, space_id)
        return outcome[0], outcome[1], version

    def insert_exemplars(self, items: Sequence[NewExemplar],
                         new_prototype_rows: Collection[str] = (),
                         sums: dict[str, SpeciesSums] | None = None, space_id: str = ""
                         ) -> tuple[list[tuple[int, bool]], int]:
        """Store many exemplars in ONE transaction: ([(id, created)], version).

        ``AddExemplars`` streams come here a batch at a time (``stream_writer``):
        one fsync per batch instead of one per photo. Each created row leaves
        its change event, as a single add does.
        ``sums`` (state of each species with all its new photos) are written
        only for species that got at least one new photo.
        """
        vectors = [self._checked(item.embedding) for item in items]
        out: list[tuple[int, bool]] = []
        with self._transaction() as conn:
            for item, vec in zip(items, vectors, strict=True):
                out.append(self._insert(conn, item, vec))
            for name in new_prototype_rows:
                conn.execute("INSERT OR IGNORE INTO prototype_rows (name) VALUES (?)", (name,))
            version = self._version(conn)
            if sums:
                touched = {item.species for item, (_, created) in zip(items, out, strict=True)
                           if created}
                self._write_sums(conn, space_id, {n: v for n, v in sums.items()
                                                  if n in touched}, version)
        return out, version

    def _checked(self, embedding: np.ndarray) -> np.ndarray:
        vec = np.asarray(embedding, dtype=np.float32)
        if vec.shape != (self.embedding_dim,):
            raise ValueError(f"embedding must have {self.embedding_dim} values, got {vec.size}")
        return vec

    def _insert(self, conn: sqlite3.Connection, item: NewExemplar,
                vec: np.ndarray) -> tuple[int, bool]:
        found = conn.execute(
            "SELECT id FROM exemplars WHERE species = ? AND content_sha256 = ?",
            (item.species, item.content_sha256),
        ).fetchone()
        if found is not None:
            return int(found[0]), False
        meta = item.meta_dict()
        cur = conn.execute(
            f"INSERT INTO exemplars (species, embedding, thumbnail, {', '.join(meta)}, "
            f"added_at, content_sha256) VALUES (?, ?, ?, {', '.join('?' * len(meta))}, ?, ?)",
            (item.species, _blob(vec), item.thumbnail, *meta.values(), time.time(),
             item.content_sha256),
        )
        new_id = int(cur.lastrowid)
        self._event(conn, "add", new_id, item.species)
        return new_id, True

    def delete_exemplars(self, ids: Sequence[int], sums: dict[str, SpeciesSums] | None = None,
                         space_id: str = "") -> tuple[list[tuple[int, str]], int]:
        """All or nothing: raises KeyError listing unknown ids, else deletes them all.

        ``sums``: the touched species' state without these photos, written in
        the same transaction.
        """
        wanted = sorted({int(i) for i in ids})
        with self._transaction() as conn:
            found = self._species_of(conn, wanted)
            missing = [i for i in wanted if i not in found]
            if missing:
                raise KeyError(missing)
            version = self._version(conn)
            for exemplar_id in wanted:
                conn.execute("DELETE FROM exemplars WHERE id = ?", (exemplar_id,))
                version = self._event(conn, "remove", exemplar_id, found[exemplar_id])
            if sums:
                self._write_sums(conn, space_id, sums, version)
        return [(i, found[i]) for i in wanted], version

    def checkpoint(self) -> None:
        """Copy the WAL back into the database now (PASSIVE: never waits for readers).

        SQLite does this by itself every 1,000 pages; after a bulk load the
        backlog would otherwise be paid by the next ordinary writes.
        """
        with self._write_lock:
            self._writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def write_species_sums(self, space_id: str, sums: dict[str, SpeciesSums]) -> None:
        """Replace these species' prototype state (a refinement, or a new space)."""
        with self._transaction() as conn:
            self._write_sums(conn, space_id, sums, self._version(conn))

    @staticmethod
    def _write_sums(conn: sqlite3.Connection, space_id: str, sums: dict[str, SpeciesSums],
                    version: int) -> None:
        conn.executemany(
            "INSERT INTO species_sums (name, space_id, count, total, refined_count, version) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "space_id = excluded.space_id, count = excluded.count, total = excluded.total, "
            "refined_count = excluded.refined_count, version = excluded.version",
            [(name, space_id, int(v.count), v.to_bytes(), int(v.refined_count), int(version))
             for name, v in sums.items()])

    def insert_species(self, name: str, record_json: str) -> int:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO species (name, record_json, added_at) VALUES (?, ?, ?)",
                (name, record_json, time.time()),
            )
            conn.execute("INSERT OR IGNORE INTO prototype_rows (name) VALUES (?)", (name,))
            return self._event(conn, "species", None, name)

    def prune_events(self, up_to_version: int) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM events WHERE version <= ?", (up_to_version,))

    @staticmethod
    def _event(conn: sqlite3.Connection, kind: str, exemplar_id: int | None, species: str) -> int:
        cur = conn.execute(
            "INSERT INTO events (kind, exemplar_id, species) VALUES (?, ?, ?)",
            (kind, exemplar_id, species),
        )
        return int(cur.lastrowid)

    @staticmethod
    def _version(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _species_of(conn: sqlite3.Connection, ids: Sequence[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            out.update(
                (int(i), s)
                for i, s in conn.execute(
                    f"SELECT id, species FROM exemplars WHERE id IN ({marks})", chunk
                )
            )
        return out

    # ---------------------------------------------------------------- reads

    def version(self) -> int:
        return self._version(self._reader())

    def count(self, species: Sequence[str] | None = None) -> int:
        conn = self._reader()
        if species is None:
            return int(conn.execute("SELECT COUNT(*) FROM exemplars").fetchone()[0])
        marks = ",".join("?" * len(species))
        return int(conn.execute(
            f"SELECT COUNT(*) FROM exemplars WHERE species IN ({marks})", list(species)
        ).fetchone()[0])

    def counts(self) -> dict[str, int]:
        rows = self._reader().execute(
            "SELECT species, COUNT(*) FROM exemplars GROUP BY species"
        ).fetchall()
        return {s: int(n) for s, n in rows}

    def species_sums(self, space_id: str) -> dict[str, SpeciesSums]:
        """Every species' prototype state kept for this space (others are stale)."""
        return {name: SpeciesSums.from_bytes(count, total, refined)
                for name, count, total, refined in self._reader().execute(
                    "SELECT name, count, total, refined_count FROM species_sums "
                    "WHERE space_id = ?", (space_id,))}

    def find(self, species: str, content_sha256: str) -> int | None:
        row = self._reader().execute(
            "SELECT id FROM exemplars WHERE species = ? AND content_sha256 = ?",
            (species, content_sha256),
        ).fetchone()
        return None if row is None else int(row[0])

    def embedding(self, exemplar_id: int) -> tuple[str, np.ndarray] | None:
        row = self._reader().execute(
            "SELECT species, embedding FROM exemplars WHERE id = ?", (int(exemplar_id),)
        ).fetchone()
        if row is None:
            return None
        return row[0], np.frombuffer(row[1], dtype="<f4").astype(np.float32)

    def embeddings_for(self, species: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n], raw embeddings [n, D]) of one species, in id order."""
        rows = self._reader().execute(
            "SELECT id, embedding FROM exemplars WHERE species = ? ORDER BY id", (species,)
        ).fetchall()
        return self._unpack(rows)

    def iter_embeddings(self, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every exemplar as (ids, raw embeddings) chunks, in id order."""
        conn = self._reader()
        last = 0
        while True:
            rows = conn.execute(
                "SELECT id, embedding FROM exemplars WHERE id > ? ORDER BY id LIMIT ?",
                (last, chunk),
            ).fetchall()
            if not rows:
                return
            ids, vecs = self._unpack(rows)
            last = int(ids[-1])
            yield ids, vecs

    def _unpack(self, rows: list) -> tuple[np.ndarray, np.ndarray]:
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, self.embedding_dim), np.float32)
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").astype(np.float32)
        return ids, vecs.reshape(len(rows), self.embedding_dim)

    def rows(self, ids: Sequence[int], with_thumbnails: bool = False) -> dict[int, ExemplarRow]:
        conn = self._reader()
        cols = META_COLUMNS + (", thumbnail" if with_thumbnails else "")
        out: dict[int, ExemplarRow] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for values in conn.execute(f"SELECT {cols} FROM exemplars WHERE id IN ({marks})",
                                       chunk):
                row = _row(values, values[8] if with_thumbnails else b"")
                out[row.exemplar_id] = row
        return out

    def page(self, species: Sequence[str] | None, after_id: int, limit: int,
             with_thumbnails: bool = False) -> list[ExemplarRow]:
        cols = META_COLUMNS + (", thumbnail" if with_thumbnails else "")
        sql = f"SELECT {cols} FROM exemplars WHERE id > ?"
        params: list = [int(after_id)]
        if species is not None:
            sql += f" AND species IN ({','.join('?' * len(species))})"
            params += list(species)
        sql += " ORDER BY id LIMIT ?"
        params.append(int(limit))
        return [_row(v, v[8] if with_thumbnails else b"")
                for v in self._reader().execute(sql, params)]

    def ids_for(self, species: Sequence[str]) -> np.ndarray:
        marks = ",".join("?" * len(species))
        rows = self._reader().execute(
            f"SELECT id FROM exemplars WHERE species IN ({marks})", list(species)
        ).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def events_after(self, version: int) -> list[Event]:
        rows = self._reader().execute(
            "SELECT version, kind, exemplar_id, species FROM events WHERE version > ? "
            "ORDER BY version", (int(version),),
        ).fetchall()
        return [Event(int(v), k, None if e is None else int(e), s) for v, k, e, s in rows]

    def runtime_species(self) -> list[str]:
        """Record JSON of every species added at runtime, in the order added."""
        return [r[0] for r in self._reader().execute(
            "SELECT record_json FROM species ORDER BY position"
        )]

    def prototype_rows(self) -> list[str]:
        return [r[0] for r in self._reader().execute(
            "SELECT name FROM prototype_rows ORDER BY position"
        )]

    def integrity(self) -> list[str]:
        """Rows that are not whole (used by the crash test): empty if all are."""
        problems = []
        size = 4 * self.embedding_dim
        for exemplar_id, species, length, sha in self._reader().execute(
            "SELECT id, species, length(embedding), content_sha256 FROM exemplars"
        ):
            if not species or length != size or len(sha) != 64:
                problems.append(f"exemplar {exemplar_id}: species={species!r} "
                                f"embedding bytes={length} sha={sha!r}")
        return problems

    def sample_ids(self, n: int, seed: int = 0) -> np.ndarray:
        """Up to ``n`` exemplar ids drawn uniformly (sorted): only ids are read."""
        ids = self.all_ids()
        if len(ids) <= n:
            return ids
        return np.sort(np.random.default_rng(seed).choice(ids, n, replace=False))

    def all_ids(self) -> np.ndarray:
        rows = self._reader().execute("SELECT id FROM exemplars ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def embeddings_by_ids(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids that exist, their raw embeddings), in id order."""
        conn = self._reader()
        rows: list = []
        wanted = sorted({int(i) for i in ids})
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += conn.execute(
                f"SELECT id, embedding FROM exemplars WHERE id IN ({marks}) ORDER BY id", chunk
            ).fetchall()
        return self._unpack(rows)
