"""The service's side of ``biolit-id bench``: a real server over gRPC on loopback.

Closed-loop Identify clients at several concurrencies (latency percentiles,
per-stage server times, micro-batcher counters, the idle single-photo
overhead) and AddExemplars streams with embedding input (durable adds).
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from biolit_id.cli.bench.common import client_channel, median_of, percentiles, timed
from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from biolit_id.server.inference.embedders.calibration import calibration_tag
from biolit_id.server.inference.embedders.export import artifact_root
from biolit_id.server.inference.preprocess import preprocess

log = logging.getLogger(__name__)


def closed_loop(port: int, photos: list[bytes] | list[pb.IdentifyRequest], concurrency: int,
                total: int) -> dict:
    """``concurrency`` clients, each sending its next photo (or request: an embedding) when
    its answer arrives."""
    requests = [p if isinstance(p, pb.IdentifyRequest) else pb.IdentifyRequest(image=p)
                for p in photos]
    counter = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    stages: dict[str, list[float]] = {k: [] for k in ("decode_ms", "embed_ms", "score_ms",
                                                       "total_ms")}
    errors: list[str] = []

    def client() -> None:
        stub = pb_grpc.SpeciesIdentifierStub(client_channel(port))
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                resp = stub.Identify(requests[i % len(requests)])
            except Exception as exc:  # report, do not crash the benchmark
                errors.append(str(exc)[:200])
                continue
            ms = (time.perf_counter() - t0) * 1e3
            with lock:
                latencies.append(ms)
                for key in stages:
                    stages[key].append(getattr(resp.timing, key))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"photos": len(latencies), "wall_s": wall, "photos_per_s": len(latencies) / wall,
            **percentiles(latencies),
            "server_stage_ms_p50": {k: float(np.median(v)) if v else float("nan")
                                    for k, v in stages.items()},
            "errors": errors[:5], "error_count": len(errors)}


def _batcher_delta(before: dict, after: dict) -> dict:
    batches = after["batches"] - before["batches"]
    photos = after["photos"] - before["photos"]
    model_ms = after["model_ms_per_batch"] * after["batches"] - (
        before["model_ms_per_batch"] * before["batches"])
    queue_ms = after["queue_ms_per_photo"] * after["photos"] - (
        before["queue_ms_per_photo"] * before["photos"])
    return {"batches": batches, "mean_batch_size": photos / max(1, batches),
            "model_ms_per_photo": model_ms / max(1, photos),
            "queue_ms_per_photo": queue_ms / max(1, photos)}


def auto_record(loaded, data_dir: Path, runtime: str, precision: str) -> dict | None:
    """The gates and per-runtime timings behind an ``auto`` choice (None if not made)."""
    path = artifact_root(loaded, data_dir) / (
        f"auto-{runtime}-{precision}-{calibration_tag(None)}.json")
    return json.loads(path.read_text("utf-8")) if path.is_file() else None


def bench_service(running, start_s: float, photos: list[bytes], small_photos: list[bytes],
                  concurrencies: Sequence[int], repeats: int, per_client: int,
                  single_runs: int) -> dict:
    """The real server over gRPC, closed-loop clients at each concurrency."""
    state = running.state
    batcher = state.batcher
    result: dict = {"runtime": state.embedder.runtime, "precision": state.embedder.precision,
                    "start_s": start_s, "max_batch_size": state.config.max_batch_size,
                    "max_batch_wait_ms": state.config.max_batch_wait_ms, "concurrency": {}}
    closed_loop(running.port, photos, 1, 2)  # warm-up: connections, first batches
    for c in concurrencies:
        runs = []
        for _ in range(repeats):
            before = batcher.stats.snapshot() if batcher else None
            run = closed_loop(running.port, photos, c, max(per_client * c, 2 * c))
            if batcher:
                run["batcher"] = _batcher_delta(before, batcher.stats.snapshot())
            runs.append(run)
        summary = {k: median_of(runs, k) for k in ("photos_per_s", "p50_ms", "p95_ms",
                                                   "p99_ms")}
        summary["server_stage_ms_p50"] = {
            k: float(statistics.median(r["server_stage_ms_p50"][k] for r in runs))
            for k in runs[0]["server_stage_ms_p50"]}
        if batcher:
            summary["batcher"] = {
                k: float(statistics.median(r["batcher"][k] for r in runs))
                for k in runs[0]["batcher"]}
        summary["errors"] = sum(r["error_count"] for r in runs)
        summary["runs"] = [{k: r[k] for k in ("photos_per_s", "p50_ms", "p95_ms", "p99_ms")}
                           for r in runs]
        result["concurrency"][str(c)] = summary
        log.info("service %s %s c=%d: %.2f photos/s, p50 %.0f ms", result["runtime"],
                 result["precision"], c, summary["photos_per_s"], summary["p50_ms"])
    # Idle single photo vs the bare forward of the same runtime, measured right here.
    policy = state.identifier.policy
    pixels = preprocess(photos[0], policy)[None]
    forward = statistics.median(timed(lambda: state.embedder.embed(pixels), single_runs, 2))
    decode = statistics.median(timed(lambda: preprocess(photos[0], policy), single_runs, 1))
    idle = [closed_loop(running.port, photos, 1, single_runs)["p50_ms"] for _ in range(repeats)]
    idle_small = [closed_loop(running.port, small_photos, 1, single_runs)["p50_ms"]
                  for _ in range(repeats)]
    small_pixels = preprocess(small_photos[0], policy)
    small_decode = statistics.median(timed(lambda: preprocess(small_photos[0], policy),
                                           single_runs, 1))
    del small_pixels
    result["idle"] = {
        "bare_forward_ms": forward,
        "decode_ms": decode,
        "p50_ms": statistics.median(idle),
        "vs_forward": statistics.median(idle) / forward,
        "vs_decode_plus_forward": statistics.median(idle) / (decode + forward),
        "small_photo_decode_ms": small_decode,
        "small_photo_p50_ms": statistics.median(idle_small),
        "small_photo_vs_forward": statistics.median(idle_small) / forward,
    }
    return result


def bench_adds(running, n_stream: int, n_single: int, chunk: int = 100) -> dict:
    """AddExemplars with embedding input over gRPC; each acknowledged add is durable."""
    state = running.state
    stub = pb_grpc.SpeciesIdentifierStub(client_channel(running.port))
    species = state.catalog.names()[0]
    dim = state.model.embedding_dim
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((n_stream + n_single, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def request(v: np.ndarray) -> pb.AddExemplarRequest:
        return pb.AddExemplarRequest(species=species, embedding=v.tolist(),
                                     source_uri="bench://synthetic")

    try:
        t0 = time.perf_counter()
        for s in range(0, n_stream, chunk):
            stub.AddExemplars(iter([request(v) for v in vectors[s : s + chunk]]))
        stream_s = time.perf_counter() - t0
        single_ms, last_id = [], -1
        for v in vectors[n_stream:]:
            a = time.perf_counter()
            resp = stub.AddExemplars(iter([request(v)]))
            single_ms.append((time.perf_counter() - a) * 1e3)
            last_id = resp.exemplar_ids[0]
        found = stub.SearchSimilar(pb.SearchSimilarRequest(embedding=vectors[-1].tolist(), k=1))
    except grpc.RpcError as exc:
        return {"skipped": f"{exc.code().name}: {exc.details()}"}
    visible = bool(found.results) and found.results[0].exemplar_id == last_id
    return {
        "species": species,
        "stream_adds": n_stream,
        "stream_chunk": chunk,
        "stream_adds_per_s": n_stream / stream_s if stream_s else float("nan"),
        "single_adds": n_single,
        "single_add_p50_ms": float(np.median(single_ms)) if single_ms else float("nan"),
        "single_adds_per_s": 1e3 * len(single_ms) / sum(single_ms) if single_ms else 0.0,
        "visible_to_next_query": visible,
    }
