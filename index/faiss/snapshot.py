"""FAISS index snapshots: one file, written atomically, checked on read.

Layout: ``MAGIC`` (8 bytes), header length (4 bytes, little endian), a JSON
header (gallery version contained, vector space, index kind, sizes, SHA-256
of the payload), then the serialised FAISS index. Writing goes to a
temporary file of the writer's own (pid and thread in its name) that is
fsynced, renamed over the old snapshot, and the directory fsynced: a crash
leaves the old snapshot or the new one, never a torn file. A snapshot is
only an accelerator: anything unexpected (another space, another index
kind, a bad checksum) makes the gallery rebuild the index from the store
instead.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from biolit_id.index.core.atomic import atomic_open

MAGIC = b"BLGSNAP1"


class SnapshotError(ValueError):
    """An unreadable or inconsistent snapshot (the gallery rebuilds instead)."""


@dataclass(frozen=True)
class SnapshotMeta:
    version: int  # gallery (event) version the index contains
    space_id: str  # "raw:<model fingerprint>" or "whitened:<whitening digest>"
    index_kind: str  # IndexSpec.describe() of the concrete index
    dim: int
    exemplar_count: int
    payload_sha256: str = ""


def write_snapshot(path: Path, meta: SnapshotMeta, payload: np.ndarray) -> None:
    path = Path(path)
    data = np.ascontiguousarray(payload, dtype=np.uint8).tobytes()
    header = dict(asdict(meta), payload_sha256=hashlib.sha256(data).hexdigest())
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    with atomic_open(path) as f:
        f.write(MAGIC)
        f.write(struct.pack("<I", len(header_bytes)))
        f.write(header_bytes)
        f.write(data)


def read_snapshot(path: Path) -> tuple[SnapshotMeta, np.ndarray] | None:
    """(meta, FAISS bytes), None when there is no snapshot; SnapshotError if corrupt."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) < 12 or raw[:8] != MAGIC:
        raise SnapshotError(f"{path} is not a gallery snapshot")
    (length,) = struct.unpack("<I", raw[8:12])
    try:
        header = json.loads(raw[12 : 12 + length].decode("utf-8"))
        meta = SnapshotMeta(**header)
    except (ValueError, TypeError) as exc:
        raise SnapshotError(f"{path}: bad header ({exc})") from None
    data = raw[12 + length :]
    if hashlib.sha256(data).hexdigest() != meta.payload_sha256:
        raise SnapshotError(f"{path}: checksum mismatch (truncated or corrupt)")
    return meta, np.frombuffer(data, dtype=np.uint8)
