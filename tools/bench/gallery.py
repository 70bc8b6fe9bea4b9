"""FAISS index kinds at scale for ``biolit-id bench``: speed, recall@10, memory; start time.

Each index is searched the way the service searches it (one query per call,
exemplar-only selector), over ``bench_vectors``' clustered synthetic vectors.
The IVF coarse quantiser is trained once per size and shared by every IVF
codec, so the comparison is between codecs, not k-means runs. Method and
results: docs/performance.md ("Gallery at scale").
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from biolit_id.cli.bench.common import start_bench_server
from biolit_id.cli.bench.vectors import K, exact_neighbours, recall_at_k, synthetic_vectors
from biolit_id.index.faiss.gallery import STORE_FILE, TRAINING_SAMPLE
from biolit_id.index.faiss.vector_index import IndexSpec, VectorIndex
from biolit_id.index.store import GalleryStore, NewExemplar, StoreError
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.inference.embedders.threads import resolve_threads
from biolit_id.server.inference.model_loader import load_model

log = logging.getLogger(__name__)

NPROBES = (8, 16, 32, 64, 128)


def time_queries(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
                 threads: int = 1, build_threads: int = 1) -> tuple[dict, np.ndarray]:
    """One query per call, as the service does; returns latency stats and the ids."""
    faiss.omp_set_num_threads(threads)
    try:
        for q in queries[:5]:  # warm caches
            search(q[None, :])
        times, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            ids = search(q[None, :])
            times.append((time.perf_counter() - t0) * 1e3)
            found.append(ids[0])
    finally:
        faiss.omp_set_num_threads(build_threads)
    arr = np.asarray(times)
    stats = {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95))}
    return stats, np.stack(found)


def _add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray,
         assign: np.ndarray | None) -> None:
    """Add in chunks, reusing the coarse assignment when the quantiser is shared."""
    ivf = faiss.try_extract_index_ivf(index)
    for s in range(0, len(vectors), 100_000):
        e = min(len(vectors), s + 100_000)
        if ivf is not None and assign is not None and ivf is index:
            x = np.ascontiguousarray(vectors[s:e])
            i = np.ascontiguousarray(ids[s:e])
            a = np.ascontiguousarray(assign[s:e])
            index.add_core(e - s, faiss.swig_ptr(x), faiss.swig_ptr(i), faiss.swig_ptr(a))
        else:
            index.add_with_ids(vectors[s:e], ids[s:e])


def bench_gallery_size(n: int, dim: int, n_queries: int, data: str = "clustered",
                       nprobes: tuple[int, ...] = NPROBES, seed: int = 0,
                       search_threads: int = 1, build_threads: int = 0) -> dict:
    """Search speed, recall@10 and bytes per exemplar of each index kind at ``n``.

    Builds (k-means, adds) use every core; searches use ``search_threads``,
    the service's setting (single-query OpenMP teams lose on a busy 2-core box).
    """
    build_threads = resolve_threads(build_threads)
    started = time.perf_counter()
    base, centres = synthetic_vectors(n, dim, data, seed)
    queries, _ = synthetic_vectors(n_queries, dim, data, seed + 1, centres=centres)
    ids = np.arange(1, n + 1, dtype=np.int64)  # store row ids start at 1
    faiss.omp_set_num_threads(build_threads)
    truth = ids[exact_neighbours(base, queries)]
    result: dict = {"exemplars": n, "dim": dim, "data": data, "queries": n_queries,
                    "candidates": []}

    # Exact: what the gallery serves below its IVF threshold.
    flat = VectorIndex.build(IndexSpec(kind="flat"), dim)
    flat.add(ids, base)
    stats, found = time_queries(lambda q, f=flat: f.search_exemplars(q, K)[1], queries,
                                search_threads, build_threads)
    result["candidates"].append({
        "index": "flat (exact)", "in_gallery": True, "nprobe": None, **stats,
        "recall@10": recall_at_k(found, truth),
        "bytes_per_exemplar": len(flat.to_bytes()) / n,
    })
    del flat

    nlist = max(1, int(4 * math.sqrt(n)))
    if n < nlist * 39:
        result["note"] = "too few vectors to train IVF"
        return result
    rng = np.random.default_rng(seed + 2)
    train = base[rng.choice(n, size=min(n, TRAINING_SAMPLE), replace=False)]
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(dim)
    kmeans_index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    kmeans_index.train(train)
    result["ivf_train_seconds"] = time.perf_counter() - t0
    result["nlist"] = nlist
    _, assign = quantizer.search(base, 1)
    assign = assign.ravel().astype(np.int64)

    def shared_quantizer() -> faiss.IndexFlatIP:
        q = faiss.IndexFlatIP(dim)
        q.add(faiss.rev_swig_ptr(quantizer.get_xb(), nlist * dim).reshape(nlist, dim).copy())
        return q

    pq_m = dim // 8
    candidates: list[tuple[str, bool, Callable[[], faiss.Index], str]] = [
        ("ivf-flat", True,
         lambda: faiss.IndexIVFFlat(shared_quantizer(), dim, nlist, faiss.METRIC_INNER_PRODUCT),
         "ivf-flat"),
        (f"ivf-pq (PQ{pq_m})", True,
         lambda: faiss.IndexIVFPQ(shared_quantizer(), dim, nlist, pq_m, 8,
                                  faiss.METRIC_INNER_PRODUCT),
         "ivf-pq"),
        ("ivf-sq8", True,
         lambda: faiss.IndexIVFScalarQuantizer(shared_quantizer(), dim, nlist,
                                               faiss.ScalarQuantizer.QT_8bit,
                                               faiss.METRIC_INNER_PRODUCT),
         "ivf-sq8"),
    ]
    for name, in_gallery, make, kind in tqdm(candidates, desc=f"gallery {n:,}", leave=False):
        t0 = time.perf_counter()
        index = make()
        index.train(train)  # the shared quantiser is trained: only the codec trains
        _add(index, base, ids, assign)
        build_s = time.perf_counter() - t0
        # The gallery's wrapper (ID selector, hashtable direct map) around each codec.
        spec = IndexSpec(kind=kind, nlist=nlist, pq_m=pq_m)
        size = len(VectorIndex(index, spec, dim).to_bytes())
        for nprobe in nprobes:
            if nprobe > nlist:
                continue
            view = VectorIndex(index, replace(spec, nprobe=nprobe), dim)
            stats, found = time_queries(lambda q, v=view: v.search_exemplars(q, K)[1], queries,
                                        search_threads, build_threads)
            result["candidates"].append({
                "index": name, "in_gallery": in_gallery, "nprobe": nprobe, **stats,
                "recall@10": recall_at_k(found, truth), "bytes_per_exemplar": size / n,
                "build_seconds": build_s,
            })
        del index, view
    result["seconds"] = time.perf_counter() - started
    result["best_under_targets"] = best_candidate(result["candidates"])
    return result


def best_candidate(candidates: list[dict], recall: float = 0.95, p50_ms: float = 5.0,
                   bytes_per: float = 600.0) -> dict | None:
    """The fastest configuration meeting the issue's recall and memory targets."""
    ok = [c for c in candidates
          if c["recall@10"] >= recall and c["bytes_per_exemplar"] <= bytes_per]
    if not ok:
        return None
    best = min(ok, key=lambda c: c["p50_ms"])
    return {**best, "meets_p50_target": best["p50_ms"] <= p50_ms}


# ---------------------------------------------------------- start time


def populate_store(data_dir: Path, model_spec: str, n: int, seed: int = 0,
                   chunk: int = 50_000) -> dict:
    """Write ``n`` synthetic exemplars straight into a gallery store, in bulk.

    Going through AddExemplars would take ``n`` fsynced transactions (the
    durable path that ``adds`` measures); a start-time measurement only needs
    the rows, so they go in through the store's bulk insert, a few big
    transactions that leave one change event per row as real adds do.
    """
    loaded = load_model(model_spec)
    store = GalleryStore(Path(data_dir) / "gallery" / STORE_FILE, loaded.fingerprint,
                         loaded.embedding_dim)
    try:
        have = store.count()
        if have >= n:
            return {"exemplars": have, "populate_s": 0.0, "reused": True}
        names = Catalog.load_default().names()
        started = time.perf_counter()
        vectors, _ = synthetic_vectors(n - have, loaded.embedding_dim, seed=seed)
        for s in tqdm(range(0, len(vectors), chunk), desc="gallery store", unit="chunk"):
            store.insert_exemplars([
                NewExemplar(species=names[i % len(names)], embedding=vec,
                            content_sha256=hashlib.sha256(vec.astype("<f4").tobytes()).hexdigest(),
                            source_uri="bench://synthetic")
                for i, vec in enumerate(vectors[s:s + chunk], start=have + s)])
        return {"exemplars": store.count(), "populate_s": time.perf_counter() - started,
                "reused": False}
    finally:
        store.close()


def bench_start(model_spec: str, data_dir: Path, n: int, gallery: str = "faiss:auto") -> dict:
    """Server start with ``n`` exemplars: first start (index rebuilt) and restart (snapshot)."""
    try:
        populated = populate_store(data_dir, model_spec, n)
    except (StoreError, OSError) as exc:
        log.warning("start bench: cannot populate the gallery store: %s", exc)
        return {"skipped": f"cannot populate the gallery store: {exc}"}
    out = {"exemplars": populated["exemplars"], "populate_s": populated["populate_s"],
           "gallery": gallery}
    for key in ("first_start_s", "restart_s"):
        running, seconds = start_bench_server(model_spec, data_dir, "torch", "fp32",
                                              gallery=gallery)
        try:
            out[key] = seconds
            out["index"] = running.state.gallery.index.spec.describe()
            out["recovery_" + key] = getattr(running.state.gallery, "recovery", "")
            out["gallery_size"] = running.state.gallery.size
        finally:
            running.stop(1.0)
    return out
