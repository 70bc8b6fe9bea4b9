"""The FAISS index: exemplars and prototypes in one id space, safe for many threads.

One index holds both, so a prototype and a photo are comparable; searches
are restricted to exemplar ids by a selector. Every kind offered supports
removal (so no HNSW), and a readers/writer lock keeps searches off an index
being mutated. Kinds and their measured cost: docs/gallery.md,
docs/performance.md.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import faiss
import numpy as np

log = logging.getLogger(__name__)

PROTOTYPE_ID_BASE = 1 << 62
KINDS = ("flat", "ivf-flat", "ivf-sq8", "ivf-pq", "auto")
IVF_CODECS = {"ivf-flat": "Flat", "ivf-sq8": "SQ8"}  # ivf-pq: PQ<m>
MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training points per centroid
PQ_CENTROIDS = 256  # 8-bit codes


class IndexSpecError(ValueError):
    """A --gallery index description that cannot be used."""


@dataclass(frozen=True)
class IndexSpec:
    kind: str = "flat"
    nlist: int = 0  # 0: 4 * sqrt(N) lists, at most N / 39
    nprobe: int = 16
    pq_m: int = 0  # 0: dim / 8 sub-quantisers (32 bytes per 256-d vector)
    auto_threshold: int = 100_000

    @classmethod
    def parse(cls, text: str) -> IndexSpec:
        """``flat`` | ``ivf-flat,nlist=1024,nprobe=32`` | ``ivf-pq,pq_m=32`` | ``auto``."""
        parts = [p.strip() for p in (text or "flat").split(",") if p.strip()]
        kind = parts[0] if parts else "flat"
        if kind not in KINDS:
            raise IndexSpecError(f"unknown gallery index {kind!r}; choose one of {KINDS}")
        values: dict[str, int] = {}
        for part in parts[1:]:
            key, _, value = part.partition("=")
            if key not in {"nlist", "nprobe", "pq_m", "auto_threshold"}:
                raise IndexSpecError(f"unknown gallery index option {key!r}")
            try:
                values[key] = int(value)
            except ValueError:
                raise IndexSpecError(f"gallery index option {key} needs an integer") from None
            if values[key] < 0:
                raise IndexSpecError(f"gallery index option {key} must be >= 0")
        spec = cls(kind=kind, **values)
        if spec.nprobe < 1:
            raise IndexSpecError("nprobe must be >= 1")
        return spec

    def describe(self) -> str:
        if self.kind == "flat":
            return "flat"
        return f"{self.kind},nlist={self.nlist},nprobe={self.nprobe},pq_m={self.pq_m}"

    def resolve(self, n_vectors: int, dim: int) -> IndexSpec:
        """A concrete kind and sizes for ``n_vectors`` (auto -> flat or ivf-sq8)."""
        kind = self.kind
        if kind == "auto":
            kind = "ivf-sq8" if n_vectors >= self.auto_threshold else "flat"
        if kind == "flat":
            return IndexSpec(kind="flat", nprobe=self.nprobe)
        # FAISS's rule of thumb, 4 * sqrt(N) lists, capped so each list trains on 39 points.
        nlist = self.nlist or max(1, min(int(4 * math.sqrt(max(n_vectors, 1))),
                                         n_vectors // MIN_POINTS_PER_LIST))
        pq_m = 0
        if kind == "ivf-pq":
            pq_m = self.pq_m or max(1, dim // 8)
            if dim % pq_m:
                raise IndexSpecError(f"pq_m={pq_m} must divide the vector size {dim}")
        needed = IndexSpec(kind=kind, nlist=nlist).training_points()
        if n_vectors < needed:
            log.warning(
                "gallery: %d vectors are too few to train %s with %d lists (need %d); "
                "using an exact flat index until the next rebuild", n_vectors, kind, nlist,
                needed,
            )
            return IndexSpec(kind="flat", nprobe=self.nprobe)
        return replace(self, kind=kind, nlist=nlist, pq_m=pq_m)

    def training_points(self) -> int:
        """Vectors an IVF kind of these sizes trains on at least (0 for flat): with
        fewer, ``resolve`` falls back to flat."""
        if self.kind == "flat":
            return 0
        needed = self.nlist * MIN_POINTS_PER_LIST
        if self.kind == "ivf-pq":
            needed = max(needed, PQ_CENTROIDS * MIN_POINTS_PER_LIST // 4)
        return needed


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _as_ids(ids) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def _as_vectors(vectors: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(-1, dim))
    return x


class VectorIndex:
    """One FAISS index plus its lock; all methods are thread-safe."""

    def __init__(self, index: faiss.Index, spec: IndexSpec, dim: int) -> None:
        self.spec = spec
        self.dim = dim
        self._index = index
        self._lock = RWLock()
        self._ivf = spec.kind.startswith("ivf-")
        self._proto_pos: dict[int, int] = {}
        if self._ivf:
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = spec.nprobe
            if ivf.direct_map.type != faiss.DirectMap.Hashtable:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        else:
            self._reindex_prototypes()

    # -------------------------------------------------------------- building

    @classmethod
    def build(cls, spec: IndexSpec, dim: int, training: np.ndarray | None = None) -> VectorIndex:
        """An empty index of ``spec``'s concrete kind, trained on ``training`` if IVF."""
        n = 0 if training is None else len(training)
        concrete = spec.resolve(n, dim)
        if concrete.kind == "flat":
            index = faiss.index_factory(dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
        else:
            codec = IVF_CODECS.get(concrete.kind, f"PQ{concrete.pq_m}")
            index = faiss.index_factory(dim, f"IVF{concrete.nlist},{codec}",
                                        faiss.METRIC_INNER_PRODUCT)
            if concrete.kind == "ivf-pq":
                # Polysemous codes only serve Hamming pre-filtering, which is not used
                # here; training them costs several times the PQ codebooks themselves.
                faiss.downcast_index(index).do_polysemous_training = False
            index.train(_as_vectors(training, dim))
        return cls(index, concrete, dim)

    @classmethod
    def from_bytes(cls, data: np.ndarray, spec: IndexSpec, dim: int) -> VectorIndex:
        index = faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
        if index.d != dim:
            raise ValueError(f"snapshot index is {index.d}-d, expected {dim}-d")
        return cls(index, spec, dim)

    def to_bytes(self) -> np.ndarray:
        with self._lock.read():
            return faiss.serialize_index(self._index)

    # ------------------------------------------------------------ mutations

    def add(self, ids, vectors: np.ndarray) -> None:
        ids = _as_ids(ids)
        if not len(ids):
            return
        x = _as_vectors(vectors, self.dim)
        with self._lock.write():
            start = self._index.ntotal
            self._index.add_with_ids(x, ids)
            if not self._ivf:
                for offset, vid in enumerate(ids):
                    if vid >= PROTOTYPE_ID_BASE:
                        self._proto_pos[int(vid)] = start + offset

    def remove(self, ids) -> int:
        ids = _as_ids(ids)
        if not len(ids):
            return 0
        with self._lock.write():
            if self._ivf:
                removed = self._index.remove_ids(faiss.IDSelectorArray(ids))
            else:
                removed = self._index.remove_ids(faiss.IDSelectorBatch(ids))
                self._reindex_prototypes()
            return int(removed)

    def set_prototypes(self, rows, vectors: np.ndarray) -> None:
        """Insert or overwrite the prototype vectors of these PrototypeSet rows."""
        ids = _as_ids(rows) + PROTOTYPE_ID_BASE
        x = _as_vectors(vectors, self.dim)
        with self._lock.write():
            if self._ivf:
                self._index.remove_ids(faiss.IDSelectorArray(ids))
                self._index.add_with_ids(x, ids)
                return
            flat = faiss.downcast_index(self._index.index)
            stored = faiss.rev_swig_ptr(flat.get_xb(), self._index.ntotal * self.dim)
            stored = stored.reshape(self._index.ntotal, self.dim)
            new_ids, new_rows = [], []
            for vid, vec in zip(ids, x, strict=True):
                pos = self._proto_pos.get(int(vid))
                if pos is None:
                    new_ids.append(vid)
                    new_rows.append(vec)
                else:
                    stored[pos] = vec
            if new_ids:
                start = self._index.ntotal
                self._index.add_with_ids(np.stack(new_rows), _as_ids(new_ids))
                for offset, vid in enumerate(new_ids):
                    self._proto_pos[int(vid)] = start + offset

    def drop_prototypes(self) -> None:
        with self._lock.write():
            if self._ivf:  # a hash-table direct map only removes listed ids
                ids = self._ivf_ids()
                ids = ids[ids >= PROTOTYPE_ID_BASE]
                if len(ids):
                    self._index.remove_ids(faiss.IDSelectorArray(_as_ids(ids)))
            else:
                high = np.iinfo(np.int64).max
                self._index.remove_ids(faiss.IDSelectorRange(PROTOTYPE_ID_BASE, high))
            self._proto_pos = {}

    def _reindex_prototypes(self) -> None:
        """Where each prototype sits in the flat array (after a compaction)."""
        ids = faiss.vector_to_array(self._index.id_map) if self._index.ntotal else []
        self._proto_pos = {
            int(vid): pos for pos, vid in enumerate(ids) if vid >= PROTOTYPE_ID_BASE
        }

    # ---------------------------------------------------------------- reads

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def exemplar_count(self) -> int:
        with self._lock.read():
            return int(self._index.ntotal) - self._prototype_count()

    def _prototype_count(self) -> int:
        if not self._ivf:
            return len(self._proto_pos)
        return int(np.count_nonzero(self._ivf_ids() >= PROTOTYPE_ID_BASE))

    def _ivf_ids(self) -> np.ndarray:
        """Every id in the inverted lists (caller holds the lock)."""
        ivf = faiss.extract_index_ivf(self._index)
        parts = [
            np.array(faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)))
            for i in range(ivf.nlist) if ivf.invlists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def search_exemplars(self, queries: np.ndarray, k: int,
                         only_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k exemplars (never prototypes): (scores [B, k], ids [B, k], -1 padded)."""
        x = _as_vectors(queries, self.dim)
        if only_ids is not None:
            selector = faiss.IDSelectorBatch(_as_ids(only_ids))
        else:
            selector = faiss.IDSelectorRange(0, PROTOTYPE_ID_BASE)
        if self._ivf:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=self.spec.nprobe)
        else:
            params = faiss.SearchParameters(sel=selector)
        with self._lock.read():
            if self._index.ntotal == 0:
                return (np.zeros((len(x), k), np.float32), np.full((len(x), k), -1, np.int64))
            scores, ids = self._index.search(x, k, params=params)
        return scores, ids

    def prototype_vector(self, row: int) -> np.ndarray:
        """The stored prototype of a row (tests check index and PrototypeSet agree)."""
        with self._lock.read():
            return self._index.reconstruct(PROTOTYPE_ID_BASE + int(row))

    def exemplar_ids(self) -> np.ndarray:
        """Every exemplar id held (sorted); O(N), for checks and rebuild decisions."""
        with self._lock.read():
            if not self._ivf:
                ids = faiss.vector_to_array(self._index.id_map) if self._index.ntotal else []
                ids = np.asarray(ids, dtype=np.int64)
            else:
                ids = self._ivf_ids()
        ids = ids[ids < PROTOTYPE_ID_BASE]
        return np.sort(ids)
