"""The gallery's shared state in Milvus: exemplar vectors, metadata, thumbnails, prototypes.

Why everything lives in Milvus (and not in each replica's SQLite). Replicas
behind a load balancer must be stateless: an exemplar added through one
replica has to be searchable, listable and removable through any other, and
a replica that dies must lose nothing. A per-replica SQLite store breaks
that (each replica would hold a different gallery), so the shared state has
to be in a shared system. The choice was Milvus itself over Milvus + PostgreSQL:

* one row carries the vector AND its metadata, so an insert is atomic on its
  own (no two-system write that can half-fail, no outbox to reconcile);
* similar-photo answers come back from one ``search`` call with their
  metadata (``output_fields``), no second round trip per hit;
* one system to run, back up and size. PostgreSQL would buy transactions
  and ORDER BY; the gallery needs neither badly: ids are content-derived
  (below), so writes are idempotent without transactions, and paging sorts
  ids client-side within a primary-key range window.

Costs, documented in docs/deploy.md: thumbnails are base64 in a VARCHAR
(Milvus has no BLOB type; ~25 KB a row) and the raw embedding is an
ARRAY<FLOAT> scalar. On a cluster both fields should be memory-mapped
(``mmap.enabled``) so query nodes page them from local disk instead of
holding them in RAM; at 100M photos thumbnails belong in object storage,
referenced by ``source_uri``.

Two collections (``C`` and ``C_species``):

* ``C``: one row per exemplar. ``vector`` is the embedding projected into the
  scoring space (the same space as the FAISS gallery, so answers match);
  ``raw`` the model's raw L2-normalised embedding, the source of truth from
  which another bundle's space can be rebuilt (export, then import).
* ``C_species``: one row per species whose prototype changed at runtime:
  its fused prototype, exemplar count, the digest of the exemplar ids it was
  computed from, a version stamp, and the catalog record of species added
  with AddSpecies. Plus a ``#meta`` row: model fingerprint, sizes, space.

Ids: ``exemplar_id_for(species, sha256)`` is a 62-bit hash of the species and
photo content. Two replicas adding the same photo write the same row
(``upsert``: Milvus does not enforce primary-key uniqueness on ``insert``),
so re-sent streams are idempotent with no coordination; a removed photo that
is added again gets its old id back. Ids stay below 2**62 so an export can
go back into a FAISS gallery, whose prototype ids start there. Ids imported
from a FAISS gallery (small integers) keep their values.

Build parameters are sent as Milvus's ``params`` JSON key-value: Milvus
servers accept it, and milvus-lite 3.x only reads that form (it silently
ignores flat ``nlist=...`` pairs, found while writing this).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from biolit_id.index.gallery_base import GalleryConfigError, GalleryError
from biolit_id.index.milvus_client import ResilientClient

log = logging.getLogger(__name__)

ID_BITS = 62
MAX_ID = (1 << ID_BITS) - 1
META_KEY = "#meta"  # species names never start with '#'
SCHEMA_VERSION = 1
THUMBNAIL_MAX_CHARS = 65535  # Milvus VARCHAR limit
QUERY_WINDOW = 4096  # rows one paging query may return before the window shrinks
QUERY_CAP = 16384  # Milvus's largest query result window (limit + offset)
INDEX_KINDS = {
    "flat": "FLAT",
    "ivf-flat": "IVF_FLAT",
    "ivf-sq8": "IVF_SQ8",
    "ivf-pq": "IVF_PQ",
    "hnsw": "HNSW",
    "autoindex": "AUTOINDEX",
}
CONSISTENCY = ("Strong", "Bounded", "Session", "Eventually")
EXEMPLAR_META_FIELDS = ("id", "species", "source_uri", "observation_id", "license",
                        "contributor", "added_at", "content_sha256")
LENGTHS = {"species": 512, "source_uri": 4096, "observation_id": 512, "license": 512,
           "contributor": 512, "content_sha256": 64}


class MilvusConfigError(GalleryConfigError):
    """A --gallery milvus value that cannot be used; the message says how to fix it."""


class MilvusGalleryError(GalleryError):
    """Milvus refused or failed an operation the gallery needs (RPCs: UNAVAILABLE)."""


# --------------------------------------------------------------------- targets


@dataclass(frozen=True)
class MilvusTarget:
    """Where the gallery lives and how it is indexed and synchronised.

    ``milvus-lite:PATH[?opts]`` (embedded, one process per file) or
    ``milvus://HOST:PORT/COLLECTION[?opts]`` (a Milvus server or cluster; also
    ``milvus-lite server``). Options: ``index`` (flat | ivf-flat | ivf-sq8 |
    ivf-pq | hnsw | autoindex), ``nlist``, ``nprobe``, ``m``, ``ef``,
    ``ef_construction``, ``pq_m``, ``consistency`` (Strong | Bounded | Session |
    Eventually), ``poll`` (seconds between prototype syncs, 0 = off),
    ``sweep`` (seconds between full syncs), ``collection`` (milvus-lite only).
    The token for a secured cluster comes from ``$BIOLIT_MILVUS_TOKEN`` so it
    never shows in a command line or a log.
    """

    uri: str
    collection: str
    lite: bool
    index: str = "flat"
    nlist: int = 1024
    nprobe: int = 16
    m: int = 16
    ef: int = 64
    ef_construction: int = 200
    pq_m: int = 0
    consistency: str = "Strong"
    poll_seconds: float = 1.0
    sweep_seconds: float = 60.0
    token: str = field(default="", repr=False)

    def describe(self) -> str:
        where = f"milvus-lite:{self.uri}" if self.lite else self.uri
        return f"{where}/{self.collection} ({self.index_description()})"

    def index_description(self) -> str:
        if self.index == "flat":
            return "flat"
        if self.index in ("ivf-flat", "ivf-sq8"):
            return f"{self.index},nlist={self.nlist},nprobe={self.nprobe}"
        if self.index == "ivf-pq":
            return f"ivf-pq,nlist={self.nlist},nprobe={self.nprobe},pq_m={self.pq_m}"
        if self.index == "hnsw":
            return f"hnsw,m={self.m},ef_construction={self.ef_construction},ef={self.ef}"
        return self.index

    def build_params(self, dim: int) -> dict:
        if self.index in ("ivf-flat", "ivf-sq8"):
            return {"nlist": self.nlist}
        if self.index == "ivf-pq":
            m = self.pq_m or max(1, dim // 8)
            if dim % m:
                raise MilvusConfigError(f"pq_m={m} must divide the vector size {dim}")
            return {"nlist": self.nlist, "m": m, "nbits": 8}
        if self.index == "hnsw":
            return {"M": self.m, "efConstruction": self.ef_construction}
        return {}

    def search_params(self) -> dict:
        if self.index.startswith("ivf"):
            return {"nprobe": self.nprobe}
        if self.index == "hnsw":
            return {"ef": self.ef}
        return {}


_INT_OPTIONS = ("nlist", "nprobe", "m", "ef", "ef_construction", "pq_m")


def parse_target(text: str) -> MilvusTarget:
    """Parse ``milvus-lite:PATH[?opts]`` or ``milvus://HOST:PORT/COLLECTION[?opts]``."""
    text = (text or "").strip()
    base, _, query = text.partition("?")
    try:
        options = dict(parse_qsl(query, keep_blank_values=False, strict_parsing=bool(query)))
    except ValueError:
        raise MilvusConfigError(f"cannot parse the options in {text!r} (key=value&...)") from None
    if base.startswith("milvus-lite:"):
        path = base[len("milvus-lite:"):]
        if not path:
            raise MilvusConfigError("milvus-lite needs a path: --gallery milvus-lite:./gallery.db")
        if not path.endswith(".db"):
            path = str(Path(path) / "gallery.db")  # a directory: the file inside it
        uri, collection, lite = os.path.abspath(path), options.pop("collection", ""), True
        collection = collection or "biolit_gallery"
    elif base.startswith("milvus://"):
        parts = urlsplit(base)
        collection = parts.path.strip("/")
        if not parts.hostname or not collection or "/" in collection:
            raise MilvusConfigError(
                f"expected milvus://HOST:PORT/COLLECTION, got {text!r}")
        uri, lite = f"http://{parts.hostname}:{parts.port or 19530}", False
        if "collection" in options:
            raise MilvusConfigError("the collection is the URI's path: milvus://HOST:PORT/NAME")
    else:
        raise MilvusConfigError(
            f"not a Milvus gallery: {text!r}; use milvus-lite:PATH or milvus://HOST:PORT/NAME")
    if not collection.replace("_", "a").isalnum() or collection[0].isdigit():
        raise MilvusConfigError(
            f"collection name {collection!r}: letters, digits and _ only, not starting "
            "with a digit")
    values: dict = {}
    for key, value in options.items():
        if key in _INT_OPTIONS:
            try:
                values[key] = int(value)
            except ValueError:
                raise MilvusConfigError(f"option {key} needs an integer, got {value!r}") from None
            if values[key] < (0 if key == "pq_m" else 1):
                raise MilvusConfigError(f"option {key} must be positive")
        elif key in ("poll", "sweep"):
            try:
                values[f"{key}_seconds"] = float(value)
            except ValueError:
                raise MilvusConfigError(f"option {key} needs seconds, got {value!r}") from None
        elif key == "index":
            if value not in INDEX_KINDS:
                raise MilvusConfigError(f"index {value!r}: choose one of {sorted(INDEX_KINDS)}")
            values["index"] = value
        elif key == "consistency":
            match = [c for c in CONSISTENCY if c.lower() == value.lower()]
            if not match:
                raise MilvusConfigError(f"consistency {value!r}: choose one of {CONSISTENCY}")
            values["consistency"] = match[0]
        else:
            raise MilvusConfigError(f"unknown Milvus gallery option {key!r}")
    return MilvusTarget(uri=uri, collection=collection, lite=lite,
                        token=os.environ.get("BIOLIT_MILVUS_TOKEN", ""), **values)


def connect(target: MilvusTarget):
    """A MilvusClient for the target; clear errors for the usual mistakes."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise MilvusConfigError(
            "the Milvus gallery needs the optional dependencies: pip install 'biolit-id[milvus]'"
        ) from None
    if target.lite:
        Path(target.uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            return MilvusClient(target.uri)
        except Exception as exc:
            raise MilvusGalleryError(
                f"cannot open milvus-lite database {target.uri} ({exc}). milvus-lite allows ONE "
                "process per database (file lock): to share it between servers run "
                f"`milvus-lite server --data-dir {target.uri} --port 19530` and use "
                f"--gallery milvus://127.0.0.1:19530/{target.collection}"
            ) from exc
    try:  # survives the server being stopped and restarted (index/milvus_client.py)
        return ResilientClient(lambda timeout: MilvusClient(  # dedicated: a new channel
            uri=target.uri, token=target.token or "", timeout=timeout, dedicated=True),
            target.uri)
    except Exception as exc:
        raise MilvusGalleryError(f"cannot reach Milvus at {target.uri} ({exc})") from exc


# ------------------------------------------------------------------- row forms


def exemplar_id_for(species: str, content_sha256: str) -> int:
    """The exemplar's id: 62 bits of SHA-256(species, content); never 0."""
    digest = hashlib.sha256(f"{species}\0{content_sha256}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") & MAX_ID) or 1


def ids_digest(ids: Sequence[int], source: str = "") -> str:
    """Which exemplars a prototype was computed from (order-free), and with what.

    64 hex characters (the column's width): 48 of the ids' SHA-256, then 16 of
    ``source``'s (``PrototypeBuilder.source``: the bundle), so that a replica
    can tell a row computed from other photos from one computed by another
    bundle (``digest_source``).
    """
    arr = np.sort(np.asarray(list(ids), dtype="<i8"))
    return (hashlib.sha256(arr.tobytes()).hexdigest()[:48]
            + hashlib.sha256(source.encode("utf-8")).hexdigest()[:16])


def digest_source(digest: str) -> str:
    """The ``source`` part of an ``ids_digest``."""
    return digest[48:]


def expr_in(field_name: str, values: Sequence) -> str:
    """A Milvus ``field in [...]`` expression; JSON quoting escapes species names."""
    return f"{field_name} in {json.dumps(list(values))}"


def encode_thumbnail(data: bytes) -> str:
    """Base64 that fits a VARCHAR: re-encoded smaller when a JPEG is unusually large."""
    text = base64.b64encode(data or b"").decode("ascii")
    if len(text) <= THUMBNAIL_MAX_CHARS:
        return text
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert("RGB")
    for quality, side in ((70, 256), (55, 224), (40, 192), (30, 128)):
        small = img.copy()
        small.thumbnail((side, side))
        out = io.BytesIO()
        small.save(out, format="JPEG", quality=quality, optimize=True)
        text = base64.b64encode(out.getvalue()).decode("ascii")
        if len(text) <= THUMBNAIL_MAX_CHARS:
            log.info("thumbnail re-encoded (q%d, %d px) to fit Milvus's VARCHAR", quality, side)
            return text
    raise ValueError("thumbnail too large even after re-encoding")


def decode_thumbnail(text: str) -> bytes:
    return base64.b64decode(text) if text else b""


def _clip(value: str, name: str) -> str:
    value = value or ""
    limit = LENGTHS[name]
    if len(value.encode("utf-8")) > limit:
        raise ValueError(f"{name} longer than {limit} bytes")
    return value


# ------------------------------------------------------------------- the index


@dataclass(frozen=True)
class SpeciesRow:
    species: str
    vector: np.ndarray
    version: int
    count: int
    ids_digest: str
    record_json: str
    created_at: float


class MilvusIndex:
    """The two collections, with the vector-index operations the gallery needs.

    Mirrors ``faiss_index.VectorIndex`` where the notions match
    (``search_exemplars`` -> (scores, ids) padded with -1, ``remove``,
    ``exemplar_ids``, ``exemplar_count``), and adds what FAISS leaves to the
    SQLite store (metadata rows, pages, per-species embeddings), because here
    vector and metadata are one row. Thread-safe: pymilvus clients are;
    writes of one process are serialised by ``write_lock`` (milvus-lite
    requires serialised writers; on a cluster it only orders this replica's).
    """

    def __init__(self, target: MilvusTarget, *, dim: int, raw_dim: int, meta: dict,
                 client=None) -> None:
        self.target = target
        self.dim = int(dim)
        self.raw_dim = int(raw_dim)
        self.name = target.collection
        self.species_name = f"{target.collection}_species"
        self.client = client if client is not None else connect(target)
        self.write_lock = threading.Lock()
        self._cl = target.consistency
        self._ensure_collections()
        self.meta = self._check_meta(meta)

    # --------------------------------------------------------------- schema

    def _ensure_collections(self) -> None:
        from pymilvus import DataType, MilvusClient

        c = self.client
        try:
            if not c.has_collection(self.name):
                schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                schema.add_field("id", DataType.INT64, is_primary=True)
                schema.add_field("species", DataType.VARCHAR, max_length=LENGTHS["species"])
                schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
                schema.add_field("raw", DataType.ARRAY, element_type=DataType.FLOAT,
                                 max_capacity=self.raw_dim)
                for name in ("content_sha256", "source_uri", "observation_id", "license",
                             "contributor"):
                    schema.add_field(name, DataType.VARCHAR, max_length=LENGTHS[name])
                schema.add_field("added_at", DataType.DOUBLE)
                schema.add_field("thumbnail", DataType.VARCHAR, max_length=THUMBNAIL_MAX_CHARS)
                params = c.prepare_index_params()
                params.add_index(field_name="vector", index_type=INDEX_KINDS[self.target.index],
                                 metric_type="IP",
                                 params={"params": self.target.build_params(self.dim)})
                params.add_index(field_name="species", index_type="INVERTED")
                c.create_collection(self.name, schema=schema, index_params=params,
                                    consistency_level=self._cl)
                log.info("created Milvus collection %s (%s)", self.name,
                         self.target.index_description())
            if not c.has_collection(self.species_name):
                schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                schema.add_field("species", DataType.VARCHAR, max_length=LENGTHS["species"],
                                 is_primary=True)
                schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
                schema.add_field("version", DataType.INT64)
                schema.add_field("count", DataType.INT64)
                schema.add_field("ids_digest", DataType.VARCHAR, max_length=64)
                schema.add_field("record_json", DataType.VARCHAR, max_length=65535)
                schema.add_field("created_at", DataType.DOUBLE)
                params = c.prepare_index_params()
                params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
                c.create_collection(self.species_name, schema=schema, index_params=params,
                                    consistency_level=self._cl)
            for name in (self.name, self.species_name):
                c.load_collection(name)
        except MilvusConfigError:
            raise
        except Exception as exc:
            raise MilvusGalleryError(
                f"cannot prepare Milvus collections {self.name}: {exc}") from exc
        self._check_existing_index()

    def _check_existing_index(self) -> None:
        """An existing collection keeps its index: say so when the URI asks for another."""
        try:
            info = self.client.describe_index(self.name, "vector") or {}
        except Exception:
            return
        have = str(info.get("index_type", "")).upper()
        want = INDEX_KINDS[self.target.index]
        if have and have != want:
            log.warning("Milvus collection %s has a %s index; the URI asks for %s: keeping %s "
                        "(drop and re-import the collection to change it)", self.name, have,
                        want, have)

    def _check_meta(self, wanted: dict) -> dict:
        wanted = dict(wanted, dim=self.dim, raw_dim=self.raw_dim, schema=SCHEMA_VERSION)
        legacy = wanted.pop("legacy_space_id", None)
        rows = self.client.get(self.species_name, ids=[META_KEY],
                               output_fields=["record_json"])
        if not rows:
            self._write_meta(wanted)
            return wanted
        have = json.loads(rows[0]["record_json"])
        relabel = bool(legacy) and have.get("space_id") == legacy
        if relabel:
            # Labelled "bundle:<id>" before space ids named the whitening: this very
            # bundle, so the same space; relabel instead of refusing it.
            have = dict(have, space_id=wanted["space_id"])
        for key in ("model_fingerprint", "space_id", "dim", "raw_dim"):
            if key in wanted and have.get(key) != wanted[key]:
                raise MilvusConfigError(
                    f"Milvus collection {self.name} holds a gallery for {key}="
                    f"{have.get(key)!r}; this server has {wanted[key]!r}. Its vectors would "
                    "score garbage: use another collection, or move the photos with "
                    "`biolit-id gallery export` then `gallery import` (re-projects them).")
        if relabel:
            self._write_meta(have)
        return have

    def _write_meta(self, meta: dict) -> None:
        self._upsert_species([{
            "species": META_KEY, "vector": _unit_e0(self.dim), "version": 0, "count": 0,
            "ids_digest": "", "record_json": json.dumps(meta, sort_keys=True),
            "created_at": 0.0,
        }])

    # -------------------------------------------------------------- writes

    def insert(self, rows: Sequence[dict]) -> None:
        """Upsert whole exemplar rows (see ``exemplar_row``); idempotent per id."""
        if not rows:
            return
        try:
            with self.write_lock:
                self.client.upsert(self.name, list(rows))
        except Exception as exc:
            raise MilvusGalleryError(f"Milvus upsert failed: {exc}") from exc

    def exemplar_row(self, exemplar_id: int, species: str, vector: np.ndarray,
                     raw: np.ndarray, *, content_sha256: str, source_uri: str = "",
                     observation_id: str = "", license: str = "", contributor: str = "",
                     added_at: float, thumbnail: bytes = b"") -> dict:
        if not 0 < int(exemplar_id) <= MAX_ID:
            raise ValueError(f"exemplar id {exemplar_id} outside 1..2**62-1")
        return {
            "id": int(exemplar_id),
            "species": _clip(species, "species"),
            "vector": np.asarray(vector, dtype=np.float32).reshape(self.dim).tolist(),
            "raw": np.asarray(raw, dtype=np.float32).reshape(self.raw_dim).tolist(),
            "content_sha256": _clip(content_sha256, "content_sha256"),
            "source_uri": _clip(source_uri, "source_uri"),
            "observation_id": _clip(observation_id, "observation_id"),
            "license": _clip(license, "license"),
            "contributor": _clip(contributor, "contributor"),
            "added_at": float(added_at),
            "thumbnail": encode_thumbnail(thumbnail),
        }

    def remove(self, ids: Sequence[int]) -> int:
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        try:
            with self.write_lock:
                self.client.delete(self.name, ids=ids)
        except Exception as exc:
            raise MilvusGalleryError(f"Milvus delete failed: {exc}") from exc
        return len(ids)

    def upsert_species(self, row: SpeciesRow) -> None:
        self._upsert_species([{
            "species": row.species,
            "vector": np.asarray(row.vector, np.float32).reshape(self.dim).tolist(),
            "version": int(row.version),
            "count": int(row.count),
            "ids_digest": row.ids_digest,
            "record_json": row.record_json,
            "created_at": float(row.created_at),
        }])

    def _upsert_species(self, rows: list[dict]) -> None:
        try:
            with self.write_lock:
                self.client.upsert(self.species_name, rows)
        except Exception as exc:
            raise MilvusGalleryError(f"Milvus upsert (species) failed: {exc}") from exc

    def flush(self, reload: bool = False) -> None:
        """Seal what was inserted. ``reload``: also release and load the collection.

        Milvus (and milvus-lite) search growing, unsealed data by brute force
        and build the configured index per sealed segment in the background;
        milvus-lite only uses a segment's index once the collection is loaded
        again. Recall measurements need the index in use, so they reload.
        """
        self.client.flush(self.name)
        if reload:
            self.client.release_collection(self.name)
            self.client.load_collection(self.name)

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
        try:
            result = self.client.search(
                self.name, data=x.tolist(), anns_field="vector", limit=int(k),
                filter=" and ".join(clauses), output_fields=list(output_fields),
                search_params={"metric_type": "IP",
                               "params": search_params or self.target.search_params()},
                consistency_level=self._cl,
            )
        except Exception as exc:
            raise MilvusGalleryError(f"Milvus search failed: {exc}") from exc
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

    def get(self, ids: Sequence[int], fields: Sequence[str]) -> dict[int, dict]:
        ids = [int(i) for i in ids]
        out: dict[int, dict] = {}
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            try:
                rows = self.client.get(self.name, ids=chunk, output_fields=list(fields))
            except Exception as exc:
                raise MilvusGalleryError(f"Milvus get failed: {exc}") from exc
            out.update((int(r["id"]), r) for r in rows)
        return out

    def iter_rows(self, fields: Sequence[str], expr: str = "",
                  batch: int = 1000) -> Iterator[list[dict]]:
        """Every row matching ``expr`` in batches (no result cap)."""
        yield from self._query_all(self.name, expr or "id >= 0",
                                   ["id", *[f for f in fields if f != "id"]], batch)

    def _query_all(self, collection: str, expr: str, fields: list[str],
                   batch: int = 1000) -> Iterator[list[dict]]:
        """One plain query when the answer fits Milvus's result window, else an iterator.

        The common case (one species, the species rows) is one round trip;
        the iterator, which pages through anything, is kept for big answers.
        """
        try:
            rows = self.client.query(collection, filter=expr, output_fields=fields,
                                     limit=QUERY_CAP, consistency_level=self._cl)
            if len(rows) < QUERY_CAP:
                if rows:
                    yield rows
                return
            iterator = self.client.query_iterator(collection, batch_size=batch, filter=expr,
                                                  output_fields=fields)
        except Exception as exc:
            raise MilvusGalleryError(f"Milvus query failed: {exc}") from exc
        try:
            while True:
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
        try:
            rows = self.client.query(self.name, filter=expr, output_fields=["id"], limit=16,
                                     consistency_level=self._cl)
        except Exception as exc:
            raise MilvusGalleryError(f"Milvus query failed: {exc}") from exc
        return min((int(r["id"]) for r in rows), default=None)

    def species_without_rows(self, known: Sequence[str]) -> list[str]:
        """Species with exemplars but not in ``known`` (the species rows): one query
        when there are none, as there should be; one more per name found."""
        names, found = list(known), []
        while True:
            expr = f"species not in {json.dumps(names)}" if names else "id >= 0"
            try:
                rows = self.client.query(self.name, filter=expr, output_fields=["species"],
                                         limit=1000, consistency_level=self._cl)
            except Exception as exc:
                raise MilvusGalleryError(f"Milvus query failed: {exc}") from exc
            new = list(dict.fromkeys(r["species"] for r in rows))
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
        try:
            rows = self.client.query(self.name, filter=expr, output_fields=["count(*)"],
                                     consistency_level=self._cl)
        except Exception as exc:
            raise MilvusGalleryError(f"Milvus count failed: {exc}") from exc
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
            rows = self.client.query(self.name, filter=f"id > {lo} and id <= {hi}{where}",
                                     output_fields=["id"], limit=QUERY_WINDOW + 1,
                                     consistency_level=self._cl)
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
                     with_vectors: bool = False) -> list[SpeciesRow]:
        fields = ["species", "version", "count", "ids_digest", "record_json", "created_at"]
        if with_vectors:
            fields.append("vector")
        clauses = [f"species != {json.dumps(META_KEY)}"]
        if since_version is not None:
            clauses.append(f"version >= {int(since_version)}")
        if names is not None:
            if not names:
                return []
            clauses.append(expr_in("species", names))
        out: list[SpeciesRow] = []
        for rows in self._query_all(self.species_name, " and ".join(clauses), fields, 2000):
            for r in rows:
                vec = (np.asarray(r["vector"], np.float32) if with_vectors
                       else np.zeros(0, np.float32))
                out.append(SpeciesRow(r["species"], vec, int(r["version"]), int(r["count"]),
                                      r["ids_digest"], r["record_json"],
                                      float(r["created_at"])))
        return out

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing must never mask the reason we are shutting down
            log.debug("Milvus client close failed", exc_info=True)


def _unit_e0(dim: int) -> list[float]:
    v = [0.0] * dim
    v[0] = 1.0
    return v
