"""Synthetic gallery vectors and exact ground truth, for the gallery benchmarks and tests.

Vectors are clustered around synthetic "species" centres because uniform
random vectors have no neighbourhood structure and make every IVF/PQ index
look useless; ``uniform`` is kept as the worst case. Ground truth and recall
are faiss's own ``contrib`` helpers (exact search by blocks, the intersection
measure), so an index is judged with the library's definition of recall.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import faiss
import numpy as np
from faiss.contrib.evaluation import knn_intersection_measure
from faiss.contrib.exhaustive_search import knn_ground_truth

K = 10
BLOCK = 100_000


def unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def synthetic_vectors(n: int, dim: int, kind: str = "clustered", seed: int = 0,
                      per_cluster: int = 500, spread: float = 0.8,
                      centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[n, dim] float32 unit rows and the centres they were drawn around.

    Clustered: centres ("species", one per ``per_cluster`` photos) are drawn
    around fewer super-centres ("genera", ten species each), so neighbouring
    clusters overlap as related species do, instead of sitting orthogonally
    apart as independent random directions in 256-d would.
    """
    rng = np.random.default_rng(seed)
    if centres is None and kind != "uniform":
        clusters = max(10, n // per_cluster)
        genera = unit_rows(rng.standard_normal((max(1, clusters // 10), dim), dtype=np.float32))
        parent = rng.integers(0, len(genera), size=clusters)
        jitter = rng.standard_normal((clusters, dim), dtype=np.float32) / math.sqrt(dim)
        centres = unit_rows(genera[parent] + 0.8 * jitter)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        noise = rng.standard_normal((e - s, dim), dtype=np.float32)
        if kind == "uniform":
            out[s:e] = unit_rows(noise)
        else:
            which = rng.integers(0, len(centres), size=e - s)
            out[s:e] = unit_rows(centres[which] + noise * (spread / math.sqrt(dim)))
    return out, (centres if centres is not None else np.zeros((0, dim), np.float32))


def _blocks(base: np.ndarray) -> Iterator[np.ndarray]:
    for s in range(0, len(base), BLOCK):
        yield np.ascontiguousarray(base[s:s + BLOCK], dtype=np.float32)


def exact_neighbours(base: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Row numbers in ``base`` of each query's exact top-k by inner product [nq, k]."""
    _, ids = knn_ground_truth(np.ascontiguousarray(queries, dtype=np.float32), _blocks(base),
                              k, metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
    return ids


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-k found (-1 padding counts as a miss)."""
    return float(knn_intersection_measure(np.asarray(found), np.asarray(truth)))
