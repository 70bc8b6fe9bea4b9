"""The gallery backends at scale for ``biolit-id bench``: adds as the gallery grows, search.

Each backend (``faiss``, ``milvus-lite``) gets the same photos: synthetic
clustered unit vectors (``bench_vectors``) of three species, as in the issue
that asked for this section, added in ``AddExemplars``-sized streams through
the servicer's own writer (``stream_writer``: a batch per transaction,
``refresh`` at the end of the stream). The adds/s of ``repeats`` streams is measured
at each checkpoint size (their median); between checkpoints the gallery is filled either by
more streams or, to keep a run short, by its bulk add. Then: search latency
(one query per call, as Identify does), recall@10 against exact search
(faiss's ``contrib`` helpers), resident memory and the consistency sweeps'
repairs. No model is loaded: prototypes start from random "text" vectors.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from biolit_id.cli.bench.vectors import K, exact_neighbours, recall_at_k, synthetic_vectors
from biolit_id.index.base import GalleryBase, GallerySpace
from biolit_id.index.gallery import open_gallery
from biolit_id.index.prototypes import PrototypeBuilder
from biolit_id.index.store import NewExemplar
from biolit_id.index.writer import write_stream
from biolit_id.server.catalog.catalog import Catalog

log = logging.getLogger(__name__)

BACKENDS = {"faiss": "faiss", "milvus-lite": "milvus-lite:{dir}/gallery.db?poll=1&sweep=10",
            "milvus-lite-hnsw": "milvus-lite:{dir}/gallery.db?poll=1&sweep=10&index=hnsw",
            # A real Milvus standalone server (the `milvus` package), started for the run in
            # {dir}/server and stopped after it; its memory is measured apart from ours.
            "milvus-server-hnsw": "milvus://127.0.0.1:{port}/bench?poll=1&sweep=10&index=hnsw"
                                  "&m=16&ef_construction=200&ef=64",
            "milvus-server-ivf-sq8": "milvus://127.0.0.1:{port}/bench?poll=1&sweep=10"
                                     "&index=ivf-sq8&nlist=1024&nprobe=32"}
CHECKPOINTS = (0, 10_000, 50_000, 100_000)
STREAM = 500
SPECIES = 3
BULK = 5000


def rss_bytes(pid: int | str = "self") -> dict[str, int]:
    """Resident memory of a process now and at its peak: this one by default
    (milvus-lite runs in-process), or a Milvus server's."""
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return {"rss_bytes": fields.get("VmRSS", 0), "peak_rss_bytes": fields.get("VmHWM", 0)}


def open_synthetic_gallery(uri: str, data_dir: Path, dim: int, seed: int = 0) -> GalleryBase:
    """A gallery over the real catalog in a synthetic ``dim``-d space (no model)."""
    catalog = Catalog.load_default()
    names = tuple(catalog.names())
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((len(names), dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def text_for(wanted: list[str]) -> np.ndarray:
        out = np.stack([np.random.default_rng(
            int.from_bytes(hashlib.sha256(n.encode()).digest()[:4], "big")).standard_normal(dim)
            for n in wanted]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    builder = PrototypeBuilder(base_names=names, base_vectors=text, text_for=text_for,
                               alpha=0.8, text_base=text, source="bench:synthetic")
    space = GallerySpace(f"bench-{dim}", dim, f"raw:bench-{dim}",
                         lambda x: np.asarray(x, np.float32))
    return open_gallery(uri.format(dir=data_dir), data_dir=data_dir, catalog=catalog,
                        builder=builder, space=space)


def synthetic_items(vectors: np.ndarray, start: int, species: Sequence[str]) -> list[NewExemplar]:
    return [NewExemplar(species=species[(start + i) % len(species)], embedding=v,
                        content_sha256=hashlib.sha256(v.tobytes()).hexdigest(),
                        source_uri=f"bench://{start + i}")
            for i, v in enumerate(vectors)]


def _stream(gallery: GalleryBase, items: list[NewExemplar]) -> tuple[float, list[int]]:
    """One AddExemplars stream as the servicer writes it: (seconds, ids)."""
    t0 = time.perf_counter()
    writer = write_stream(gallery, items)
    return time.perf_counter() - t0, writer.ids


def bench_backend(backend: str, data_dir: Path, *, dim: int = 512,
                  checkpoints: Sequence[int] = CHECKPOINTS, stream: int = STREAM,
                  fill: str = "bulk", queries: int = 200, repeats: int = 3,
                  seed: int = 0) -> dict:
    """adds/s at each checkpoint, then search p50/p95, recall@10, memory, repairs."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    total = max(checkpoints) + stream * repeats
    vectors, centres = synthetic_vectors(total, dim, seed=seed)
    query_vectors, _ = synthetic_vectors(queries, dim, seed=seed + 1, centres=centres)
    started = time.perf_counter()
    memory_before = rss_bytes()
    server = None
    if backend.startswith("milvus-server"):
        from biolit_id.index.milvus.server import EmbeddedMilvus

        server = EmbeddedMilvus(data_dir / "server", port=0)
        server_start_s = server.start()
    uri = BACKENDS[backend].format(dir=data_dir, port=server.port if server else 0)
    try:
        gallery = open_synthetic_gallery(uri, data_dir, dim, seed)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    species = list(gallery.prototypes().names[:SPECIES])
    ids: list[int] = []
    result: dict = {"backend": backend, "uri": uri,
                    "dim": dim, "species": SPECIES, "stream": stream, "fill": fill,
                    "adds": []}
    if server is not None:
        result["server"] = {"version": gallery.index.caps.version_text,
                            "start_s": server_start_s}
    try:
        for size in sorted(checkpoints):
            while len(ids) < size:  # fill up to the checkpoint
                n = min(stream if fill == "stream" else BULK, size - len(ids))
                batch = synthetic_items(vectors[len(ids):len(ids) + n], len(ids), species)
                if fill == "stream":
                    ids += _stream(gallery, batch)[1]
                else:
                    ids += [o.exemplar_id for o in gallery.add_many(batch)]
            if fill == "bulk" and hasattr(gallery, "snapshot"):
                # A bulk fill leaves the FAISS snapshot and WAL checkpoint that streams
                # would have spread over their adds: do them now, not in the timed streams.
                gallery.snapshot()
                gallery.store.checkpoint()
            settled = time.perf_counter()
            gallery.settle()  # background work (a snapshot, segment indexes) is timed apart
            settle_s = time.perf_counter() - settled
            rates = []
            for _ in range(repeats):  # the median: background work (compaction) comes in bursts
                seconds, got = _stream(gallery, synthetic_items(vectors[len(ids):len(ids) + stream],
                                                       len(ids), species))
                ids += got
                rates.append(stream / seconds)
            result["adds"].append({"photos_before": size, "adds_per_s": float(np.median(rates)),
                                   "streams_adds_per_s": rates, "settle_s": settle_s})
            log.info("gallery %s: %d adds/s at %d photos (streams: %s)", backend,
                     np.median(rates), size, " ".join(f"{r:.0f}" for r in rates))
        result["photos"] = len(ids)
        gallery.settle()  # searches as after a restart: through the built index
        result |= _search(gallery, vectors[:len(ids)], np.asarray(ids, np.int64), query_vectors)
        result["memory"] = rss_bytes()
        result["memory_before_open"] = memory_before
        if server is not None:
            result["server"] |= rss_bytes(server.pid)
        result["repairs"] = getattr(gallery, "repairs", 0)
        result["sweeps"] = getattr(gallery, "sweeps", 0)
    finally:
        gallery.close()
        if server is not None:
            server.stop()
    result["seconds"] = time.perf_counter() - started
    first, last = result["adds"][0]["adds_per_s"], result["adds"][-1]["adds_per_s"]
    result["adds_ratio_last_vs_first"] = last / first
    return result


def _search(gallery: GalleryBase, stored: np.ndarray, ids: np.ndarray,
            queries: np.ndarray) -> dict:
    truth = ids[exact_neighbours(stored, queries, K)]
    for q in queries[:5]:  # warm-up
        gallery.search(q[None, :], K)
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = gallery.search(q[None, :], K)[0]
        times.append((time.perf_counter() - t0) * 1e3)
        row = [h.exemplar_id for h in hits] + [-1] * (K - len(hits))
        found.append(row[:K])
    return {"search_p50_ms": float(np.percentile(times, 50)),
            "search_p95_ms": float(np.percentile(times, 95)),
            "recall@10": recall_at_k(np.asarray(found, np.int64), truth)}
