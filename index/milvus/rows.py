"""The rows the Milvus gallery writes: content-derived ids, exemplar rows, species rows.

Ids are a 62-bit hash of (species, photo content): two replicas adding the
same photo write the same row (an upsert; Milvus does not enforce primary-key
uniqueness on insert), so re-sent streams are idempotent without coordination,
and a removed photo added again gets its old id back. Ids stay below 2**62 so
that an export can go back into a FAISS gallery, whose prototype ids start
there; ids imported from a FAISS gallery (small integers) keep their values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from biolit_id.index.milvus.thumbnail import encode_thumbnail
from biolit_id.index.prototypes import SpeciesSums

ID_BITS = 62
MAX_ID = (1 << ID_BITS) - 1
EXEMPLAR_META_FIELDS = ("id", "species", "source_uri", "observation_id", "license",
                        "contributor", "added_at", "content_sha256")
LENGTHS = {"species": 512, "source_uri": 4096, "observation_id": 512, "license": 512,
           "contributor": 512, "content_sha256": 64}


@dataclass(frozen=True)
class SpeciesRow:
    """One species-collection row: the prototype, the state it is kept from, the record.

    ``total``/``refined_count``: the running sums (``prototypes.SpeciesSums``),
    so that any replica updates or recomputes the prototype without reading
    photos; ``ids_digest``: ``ids_checksum`` of its photos and the source tag.
    """

    species: str
    vector: np.ndarray
    version: int
    count: int
    ids_digest: str
    record_json: str
    created_at: float
    total: np.ndarray | None = None
    refined_count: int = 0

    def sums(self, dim: int) -> SpeciesSums:
        total = (np.zeros(dim) if self.total is None or not len(self.total)
                 else np.asarray(self.total, np.float64))
        return SpeciesSums(self.count, total, self.refined_count)

    @property
    def checksum(self) -> int:
        return int(self.ids_digest[:16] or "0", 16)


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


def ids_checksum(ids: Sequence[int], start: int = 0) -> int:
    """Order-free 64-bit checksum of exemplar ids, updatable per id in O(1).

    XOR of a 64-bit mix (splitmix64's finaliser) of each id: adding or removing
    an id XORs its mix in or out, so a species row keeps the checksum of its
    photos without re-reading them, and a full check recomputes it from ids.
    """
    x = np.asarray(list(ids), dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return int(np.bitwise_xor.reduce(x, initial=np.uint64(start)))


def state_digest(checksum: int, source: str) -> str:
    """The ``ids_digest`` column: 16 hex of ``ids_checksum``, then 16 of the source's hash
    at ``digest_source``'s place (48:)."""
    return f"{checksum:016x}" + "0" * 32 + hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


def digest_source(digest: str) -> str:
    """The ``source`` part of an ``ids_digest``."""
    return digest[48:]


def expr_in(field_name: str, values: Sequence) -> str:
    """A Milvus ``field in [...]`` expression; JSON quoting escapes species names."""
    return f"{field_name} in {json.dumps(list(values))}"


def clip(value: str, name: str) -> str:
    """``value`` if it fits its VARCHAR column, else ValueError (never truncated silently)."""
    value = value or ""
    limit = LENGTHS[name]
    if len(value.encode("utf-8")) > limit:
        raise ValueError(f"{name} longer than {limit} bytes")
    return value


def exemplar_row(exemplar_id: int, species: str, vector: np.ndarray, raw: np.ndarray, *,
                 dim: int, raw_dim: int, content_sha256: str, source_uri: str = "",
                 observation_id: str = "", license: str = "", contributor: str = "",
                 added_at: float, thumbnail: bytes = b"") -> dict:
    """One exemplar-collection row: projected ``vector``, ``raw`` embedding, metadata."""
    if not 0 < int(exemplar_id) <= MAX_ID:
        raise ValueError(f"exemplar id {exemplar_id} outside 1..2**62-1")
    return {
        "id": int(exemplar_id),
        "species": clip(species, "species"),
        "vector": np.asarray(vector, dtype=np.float32).reshape(dim).tolist(),
        "raw": np.asarray(raw, dtype=np.float32).reshape(raw_dim).tolist(),
        "content_sha256": clip(content_sha256, "content_sha256"),
        "source_uri": clip(source_uri, "source_uri"),
        "observation_id": clip(observation_id, "observation_id"),
        "license": clip(license, "license"),
        "contributor": clip(contributor, "contributor"),
        "added_at": float(added_at),
        "thumbnail": encode_thumbnail(thumbnail),
    }


def species_row_dict(row: SpeciesRow, dim: int) -> dict:
    total = np.zeros(dim) if row.total is None else np.asarray(row.total, np.float64)
    return {
        "species": row.species,
        "vector": np.asarray(row.vector, np.float32).reshape(dim).tolist(),
        "version": int(row.version),
        "count": int(row.count),
        "ids_digest": row.ids_digest,
        "record_json": row.record_json,
        "created_at": float(row.created_at),
        "total": total.reshape(dim).tolist(),
        "refined_count": int(row.refined_count),
    }
