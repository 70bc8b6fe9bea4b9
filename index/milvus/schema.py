"""The two collections of a Milvus gallery, created on first use and checked on every open.

* ``C``: one row per exemplar. ``vector`` is the embedding projected into the
  scoring space (the FAISS gallery's space, so answers match); ``raw`` the
  model's L2-normalised embedding, from which another bundle's space can be
  rebuilt. Thumbnails are base64 VARCHARs (no BLOB type in Milvus).
* ``C_species``: one row per species whose prototype changed at runtime (with
  its running sums, schema 2), plus a ``#meta`` row naming the model, sizes and
  space the vectors belong to, so that a replica with another model is refused
  instead of scoring garbage. A schema-1 species collection (no sums) is
  rebuilt once on open; it holds only derived data and runtime species records.
"""

from __future__ import annotations

import json
import logging

from biolit_id.index.milvus.caps import ServerCaps, is_index_kind_refusal
from biolit_id.index.milvus.errors import MilvusConfigError, milvus_errors
from biolit_id.index.milvus.rows import LENGTHS
from biolit_id.index.milvus.target import INDEX_KINDS, MilvusTarget
from biolit_id.index.milvus.thumbnail import THUMBNAIL_MAX_CHARS

log = logging.getLogger(__name__)

META_KEY = "#meta"  # species names never start with '#'
SCHEMA_VERSION = 2
_META_FIELDS = ("content_sha256", "source_uri", "observation_id", "license", "contributor")


def ensure_collections(client, target: MilvusTarget, dim: int, raw_dim: int,
                       caps: ServerCaps) -> None:
    """Create whichever collection is missing, load both, warn about a different index."""
    from pymilvus import DataType, MilvusClient  # optional extra, present once connected

    name, species_name = target.collection, target.species_collection
    with milvus_errors(f"preparing collections {name}"):
        if not client.has_collection(name):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("species", DataType.VARCHAR, max_length=LENGTHS["species"])
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            schema.add_field("raw", DataType.ARRAY, element_type=DataType.FLOAT,
                             max_capacity=raw_dim)
            for field in _META_FIELDS:
                schema.add_field(field, DataType.VARCHAR, max_length=LENGTHS[field])
            schema.add_field("added_at", DataType.DOUBLE)
            schema.add_field("thumbnail", DataType.VARCHAR, max_length=THUMBNAIL_MAX_CHARS)
            client.create_collection(name, schema=schema,
                                     consistency_level=target.consistency or "Strong")
            params = client.prepare_index_params()
            params.add_index(field_name="vector", index_type=INDEX_KINDS[target.index],
                             metric_type="IP", params={"params": target.build_params(dim)})
            client.create_index(name, params)
            scalar = _index_species(client, name, caps)
            log.info("created Milvus collection %s (%s; species index %s) on %s", name,
                     target.index_description(), scalar or "none", caps.describe)
        old_rows = None
        if client.has_collection(species_name):
            old_rows = _species_rows_to_upgrade(client, species_name)
        if not client.has_collection(species_name):
            _create_species_collection(client, target, dim)
        if old_rows is not None:
            _write_upgraded(client, target, old_rows, dim)
        for collection in (name, species_name):
            client.load_collection(collection)
    _warn_if_other_index(client, target)


def _index_species(client, name: str, caps: ServerCaps) -> str | None:
    """The best scalar index on ``species`` that this server accepts (or none: filters
    on species then scan, which only matters at millions of photos)."""
    for kind in caps.scalar_index_candidates:
        params = client.prepare_index_params()
        params.add_index(field_name="species", index_type=kind, index_name="species")
        try:
            client.create_index(name, params)
            return kind
        except Exception as exc:
            if not is_index_kind_refusal(exc):
                raise
            log.info("Milvus %s refuses a %s index on species (%s)", caps.describe, kind, exc)
    log.warning("no scalar index on %s.species: this Milvus accepts none of %s", name,
                caps.scalar_index_candidates)
    return None


def _create_species_collection(client, target: MilvusTarget, dim: int) -> None:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("species", DataType.VARCHAR, max_length=LENGTHS["species"],
                     is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("version", DataType.INT64)
    schema.add_field("count", DataType.INT64)
    schema.add_field("ids_digest", DataType.VARCHAR, max_length=64)
    schema.add_field("record_json", DataType.VARCHAR, max_length=65535)
    schema.add_field("created_at", DataType.DOUBLE)
    schema.add_field("total", DataType.ARRAY, element_type=DataType.DOUBLE, max_capacity=dim)
    schema.add_field("refined_count", DataType.INT64)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    client.create_collection(target.species_collection, schema=schema, index_params=params,
                             consistency_level=target.consistency or "Strong")


def _species_rows_to_upgrade(client, species_name: str) -> list[dict] | None:
    """A schema-1 species collection's rows (then dropped), or None if it is current."""
    fields = {f["name"] for f in client.describe_collection(species_name)["fields"]}
    if "total" in fields:
        return None
    client.load_collection(species_name)
    rows = client.query(species_name, filter='species != ""', limit=16384,
                        output_fields=["species", "record_json", "created_at"])
    client.drop_collection(species_name)
    log.warning("Milvus collection %s has schema 1 (prototypes without running sums): "
                "rebuilt with schema 2; every species' prototype is recomputed from its "
                "photos once. Upgrade every replica of this gallery.", species_name)
    return rows


def _write_upgraded(client, target: MilvusTarget, rows: list[dict], dim: int) -> None:
    """Runtime species records back, with no state: the gallery recomputes it (count 0 rows
    under photos are a real inconsistency to its check). Old imports kept their ids."""
    out = []
    for r in rows:
        if r["species"] == META_KEY:
            meta = dict(json.loads(r["record_json"]), schema=SCHEMA_VERSION, imported_ids=True)
            out.append(meta_row(meta, dim))
            continue
        unit_e0 = [1.0] + [0.0] * (dim - 1)
        out.append({"species": r["species"], "vector": unit_e0, "version": 0, "count": 0,
                    "ids_digest": "", "record_json": r["record_json"],
                    "created_at": float(r["created_at"]), "total": [0.0] * dim,
                    "refined_count": 0})
    if out:
        client.upsert(target.species_collection, out)


def _warn_if_other_index(client, target: MilvusTarget) -> None:
    """An existing collection keeps its index: say so when the URI asks for another."""
    try:
        info = client.describe_index(target.collection, "vector") or {}
    except Exception:  # an older server without describe_index: nothing to compare
        return
    have = str(info.get("index_type", "")).upper()
    want = INDEX_KINDS[target.index]
    if have and have != want:
        log.warning("Milvus collection %s has a %s index; the URI asks for %s: keeping %s "
                    "(drop and re-import the collection to change it)", target.collection,
                    have, want, have)


def meta_row(meta: dict, dim: int) -> dict:
    unit_e0 = [0.0] * dim
    unit_e0[0] = 1.0  # Milvus refuses a zero vector
    return {"species": META_KEY, "vector": unit_e0, "version": 0, "count": 0,
            "ids_digest": "", "record_json": json.dumps(meta, sort_keys=True),
            "created_at": 0.0, "total": [0.0] * dim, "refined_count": 0}


def read_meta(client, species_name: str) -> dict | None:
    with milvus_errors("meta read"):
        rows = client.get(species_name, ids=[META_KEY], output_fields=["record_json"])
    return json.loads(rows[0]["record_json"]) if rows else None


def check_meta(client, target: MilvusTarget, wanted: dict, dim: int, raw_dim: int,
               write_lock) -> dict:
    """The collection's meta, written on first use; refuses another model or space.

    ``wanted["legacy_space_id"]``: the label collections had before space ids
    named the whitening ("bundle:<id>"); a collection with that label is this
    very bundle's space, so it is relabelled instead of refused.
    """
    wanted = dict(wanted, dim=dim, raw_dim=raw_dim, schema=SCHEMA_VERSION)
    legacy = wanted.pop("legacy_space_id", None)
    have = read_meta(client, target.species_collection)
    if have is None:
        _write_meta(client, target, wanted, dim, write_lock)
        return wanted
    relabel = bool(legacy) and have.get("space_id") == legacy
    if relabel:
        have = dict(have, space_id=wanted["space_id"])
    for key in ("model_fingerprint", "space_id", "dim", "raw_dim"):
        if key in wanted and have.get(key) != wanted[key]:
            raise MilvusConfigError(
                f"Milvus collection {target.collection} holds a gallery for {key}="
                f"{have.get(key)!r}; this server has {wanted[key]!r}. Its vectors would "
                "score garbage: use another collection, or move the photos with "
                "`biolit-id gallery export` then `gallery import` (re-projects them).")
    if relabel or have.get("schema") != SCHEMA_VERSION:
        have = dict(have, schema=SCHEMA_VERSION)
        _write_meta(client, target, have, dim, write_lock)
    return have


def write_meta(client, target: MilvusTarget, meta: dict, dim: int, write_lock) -> None:
    """Replace the ``#meta`` row (``imported_ids`` set by an import, say)."""
    _write_meta(client, target, meta, dim, write_lock)


def _write_meta(client, target: MilvusTarget, meta: dict, dim: int, write_lock) -> None:
    with milvus_errors("upsert (species)"), write_lock:
        client.upsert(target.species_collection, [meta_row(meta, dim)])
