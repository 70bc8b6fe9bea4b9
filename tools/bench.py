"""``biolit-id bench``: the seed's path vs the service, runtimes, and the gallery at scale.

Speed is judged here, on one machine and the same photos side by side, never
in unit tests. Writes JSON plus a printed table. Sections, how to run it, and
the measured results with the machine they came from: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SECTIONS = ("decode", "seed", "forward", "service", "adds", "gallery", "start")
DEFAULT_RUNTIMES = ("torch:fp32", "torch:bf16", "onnx:fp32", "onnx:int8", "openvino:fp32",
                    "openvino:bf16", "openvino:int8")
TARGETS = {
    "service_c4_vs_seed": 3.0,
    "service_c4_vs_seed_int8": 5.0,
    "idle_p50_vs_forward": 1.15,
    "search_1m_p50_ms": 5.0,
    "search_1m_recall10": 0.95,
    "search_1m_bytes_per_exemplar": 600.0,
    "adds_per_second": 500.0,
}


# ------------------------------------------------------------------ helpers


def percentiles(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    return {f"p{p}_ms": float(np.percentile(arr, p)) for p in (50, 95, 99)}


def median_of(runs: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def timed(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    """Milliseconds per call over ``runs`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def parse_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        runtime, _, precision = item.strip().partition(":")
        pairs.append((runtime, precision or "fp32"))
    return pairs


def machine() -> dict:
    import os

    from biolit_id.server.embedders.hardware import cpu_has_bf16, cpu_identity
    from biolit_id.server.embedders.threads import available_cores

    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {"cpu": cpu_identity(), "cores": available_cores(), "bf16": cpu_has_bf16(),
            "python": platform.python_version(), "load_average_at_start": load}


# -------------------------------------------------------------- sections


def bench_decode(loaded, photos: list[bytes], repeats: int) -> dict:
    """Full vs draft-mode decode, and what the fast path does to embeddings."""
    from biolit_id.server.embedders.eager import TorchEmbedder
    from biolit_id.server.embedders.gate import cosine_rows
    from biolit_id.server.preprocess import ImagePolicy, preprocess

    base = dict(image_size=loaded.image_size, mean=loaded.mean, std=loaded.std)
    full = ImagePolicy(**base, fast_decode=False)
    fast = ImagePolicy(**base, fast_decode=True)
    runs = {"full": [], "fast": []}
    for _ in range(repeats):
        for name, policy in (("full", full), ("fast", fast)):
            times = [timed(lambda p=p, pol=policy: preprocess(p, pol), 1, 0)[0] for p in photos]
            runs[name].append(statistics.median(times))
    embedder = TorchEmbedder(loaded, "fp32")
    emb_full = embedder.embed(np.stack([preprocess(p, full) for p in photos]))
    emb_fast = embedder.embed(np.stack([preprocess(p, fast) for p in photos]))
    cos = cosine_rows(emb_full, emb_fast)
    full_ms, fast_ms = statistics.median(runs["full"]), statistics.median(runs["fast"])
    return {"full_ms_per_photo": full_ms, "fast_ms_per_photo": fast_ms,
            "speedup": full_ms / fast_ms, "cosine_fast_vs_full_min": float(cos.min()),
            "cosine_fast_vs_full_mean": float(cos.mean())}


def bench_seed_path(loaded, photos: list[bytes], repeats: int) -> dict:
    """Eager fp32, full decode, one photo at a time in a Python loop."""
    from biolit_id.server.embedders.eager import TorchEmbedder
    from biolit_id.server.preprocess import ImagePolicy, preprocess

    policy = ImagePolicy(image_size=loaded.image_size, mean=loaded.mean, std=loaded.std,
                         fast_decode=False)
    embedder = TorchEmbedder(loaded, "fp32")
    embedder.embed(preprocess(photos[0], policy)[None])  # warm-up
    runs = []
    for _ in range(repeats):
        decode, forward = [], []
        t0 = time.perf_counter()
        for photo in photos:
            a = time.perf_counter()
            pixels = preprocess(photo, policy)
            b = time.perf_counter()
            embedder.embed(pixels[None])
            c = time.perf_counter()
            decode.append((b - a) * 1e3)
            forward.append((c - b) * 1e3)
        wall = time.perf_counter() - t0
        runs.append({"photos_per_s": len(photos) / wall,
                     "ms_per_photo": wall * 1e3 / len(photos),
                     "decode_ms": statistics.median(decode),
                     "forward_ms": statistics.median(forward)})
    return {k: median_of(runs, k) for k in runs[0]} | {"runs": runs}


def bench_forward(loaded, pairs: list[tuple[str, str]], cache_dir: Path, pixels: np.ndarray,
                  repeats: int, batch: int, single_runs: int) -> list[dict]:
    """The image tower alone, per runtime and precision."""
    from biolit_id.server.embedders.auto import build_embedder
    from biolit_id.server.embedders.base import RuntimeUnavailableError
    from biolit_id.server.embedders.gate import GATE_COSINE, embed_batched, fidelity

    reference = None
    results = []
    for runtime, precision in pairs:
        row: dict = {"runtime": runtime, "precision": precision}
        t0 = time.perf_counter()
        try:
            embedder = build_embedder(loaded, runtime, precision, cache_dir)
        except (RuntimeUnavailableError, ValueError) as exc:
            row["error"] = str(exc)
            results.append(row)
            log.warning("forward %s %s: %s", runtime, precision, exc)
            continue
        row["build_s"] = time.perf_counter() - t0
        one = pixels[:1]
        many = np.concatenate([pixels] * (batch // len(pixels) + 1))[:batch]
        single = timed(lambda e=embedder, x=one: e.embed(x), single_runs, warmup=2)
        row["batch1_ms"] = statistics.median(single)
        batched = [timed(lambda e=embedder, x=many: e.embed(x), 1, warmup=1 if r == 0 else 0)[0]
                   for r in range(repeats)]
        row["batch"] = batch
        row["batched_photos_per_s"] = batch * 1e3 / statistics.median(batched)
        out = embed_batched(embedder, pixels)
        if reference is None and (runtime, precision) == ("torch", "fp32"):
            reference = out
        if reference is None:
            reference = embed_batched(build_embedder(loaded, "torch", "fp32", cache_dir), pixels)
        gate = fidelity(reference, out, runtime, precision)
        row.update(cosine_min=gate.cosine_min, cosine_mean=gate.cosine_mean,
                   gate_passed=gate.passed, gate_threshold=GATE_COSINE)
        results.append(row)
        log.info("forward %s %s: %.1f ms batch 1, %.2f photos/s batched, cos %.5f",
                 runtime, precision, row["batch1_ms"], row["batched_photos_per_s"],
                 gate.cosine_min)
        del embedder
    return results


def _client_channel(port: int):
    import grpc

    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", 64 << 20),
                 ("grpc.max_receive_message_length", 64 << 20)],
    )


def closed_loop(port: int, photos: list[bytes], concurrency: int, total: int) -> dict:
    """``concurrency`` clients, each sending its next photo when its answer arrives."""
    from biolit_id.proto import identification_pb2 as pb
    from biolit_id.proto import identification_pb2_grpc as pb_grpc

    counter = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    stages: dict[str, list[float]] = {k: [] for k in ("decode_ms", "embed_ms", "score_ms",
                                                       "total_ms")}
    errors: list[str] = []

    def client() -> None:
        stub = pb_grpc.SpeciesIdentifierStub(_client_channel(port))
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                resp = stub.Identify(pb.IdentifyRequest(image=photos[i % len(photos)]))
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


def start_bench_server(spec: str, data_dir: Path, runtime: str, precision: str,
                       **overrides):
    from biolit_id.server.app import start_server
    from biolit_id.server.config import ServerConfig

    config = ServerConfig(model=spec, data_dir=data_dir, port=0, runtime=runtime,
                          precision=precision, grace_seconds=1.0,
                          max_message_bytes=64 << 20)
    for key, value in overrides.items():
        setattr(config, key, value)
    t0 = time.perf_counter()
    running = start_server(config)
    return running, time.perf_counter() - t0


def auto_record(loaded, data_dir: Path, runtime: str, precision: str) -> dict | None:
    """The gates and per-runtime timings behind an ``auto`` choice (None if not made)."""
    from biolit_id.server.embedders.calibration import calibration_tag
    from biolit_id.server.embedders.export import artifact_root

    path = artifact_root(loaded, data_dir) / (
        f"auto-{runtime}-{precision}-{calibration_tag(None)}.json")
    return json.loads(path.read_text("utf-8")) if path.is_file() else None


def bench_service(running, start_s: float, photos: list[bytes], small_photos: list[bytes],
                  concurrencies: Sequence[int], repeats: int, per_client: int,
                  single_runs: int) -> dict:
    """The real server over gRPC, closed-loop clients at each concurrency."""
    from biolit_id.server.preprocess import preprocess

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
    import grpc

    from biolit_id.proto import identification_pb2 as pb
    from biolit_id.proto import identification_pb2_grpc as pb_grpc

    state = running.state
    stub = pb_grpc.SpeciesIdentifierStub(_client_channel(running.port))
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


# ---------------------------------------------------------------- targets


def evaluate_targets(results: dict) -> list[dict]:
    """Each issue target with what was measured and whether it is met."""
    rows = []
    seed = results.get("seed", {}).get("photos_per_s")
    for svc in results.get("service", []):
        c4 = svc["concurrency"].get("4")
        if seed and c4:
            ratio = c4["photos_per_s"] / seed
            int8 = svc["precision"] == "int8"
            target = TARGETS["service_c4_vs_seed_int8" if int8 else "service_c4_vs_seed"]
            rows.append({"target": f"service c=4 vs seed ({_label(svc)})",
                         "goal": f">= {target:g}x", "measured": ratio, "met": ratio >= target})
        idle = svc.get("idle")
        if idle:
            goal = TARGETS["idle_p50_vs_forward"]
            rows.append({"target": f"idle p50 / bare forward ({_label(svc)}, full-size photo)",
                         "goal": f"<= {goal}", "measured": idle["vs_forward"],
                         "met": idle["vs_forward"] <= goal})
            rows.append({"target": f"idle p50 / bare forward ({_label(svc)}, small photo)",
                         "goal": f"<= {goal}", "measured": idle["small_photo_vs_forward"],
                         "met": idle["small_photo_vs_forward"] <= goal})
    for size in results.get("gallery", []):
        if size["exemplars"] < 1_000_000:
            continue
        best = size.get("best_under_targets")
        where = ("" if not best else f", {best['index']} nprobe={best['nprobe']}"
                 + ("" if best["in_gallery"] else ", not in the gallery yet"))
        rows.append({"target": f"1M search p50 (recall@10 >= 0.95, <= 600 B/ex.{where})",
                     "goal": "<= 5 ms",
                     "measured": best["p50_ms"] if best else float("nan"),
                     "met": bool(best and best["meets_p50_target"]),
                     "index": f"{best['index']} nprobe={best['nprobe']}" if best else "none"})
    adds = results.get("adds", {})
    if "stream_adds_per_s" in adds:
        goal = TARGETS["adds_per_second"]
        rows.append({"target": "adds/s (stream, durable)", "goal": f">= {goal:g}",
                     "measured": adds["stream_adds_per_s"],
                     "met": adds["stream_adds_per_s"] >= goal})
    return rows


# ------------------------------------------------------------------ table


def _label(svc: dict) -> str:
    threads = svc.get("model_threads")
    return f"{svc['runtime']} {svc['precision']}" + (f" ({threads} thr)" if threads else "")


def table(results: dict) -> str:
    lines: list[str] = []

    def section(title: str, header: Sequence[str], rows: list[Sequence]) -> None:
        if not rows:
            return
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
        lines.append(f"\n## {title}")
        lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths,
                                                                    strict=True)) + " |")
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in rows:
            lines.append("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths,
                                                                         strict=True)) + " |")

    f = lambda x, d=1: "-" if x is None or (isinstance(x, float) and np.isnan(x)) else (  # noqa: E731
        f"{x:.{d}f}")
    seed = results.get("seed")
    if seed:
        section("Seed path (eager fp32, full decode, Python loop)",
                ["photos/s", "ms/photo", "decode ms", "forward ms"],
                [[f(seed["photos_per_s"], 2), f(seed["ms_per_photo"]), f(seed["decode_ms"]),
                  f(seed["forward_ms"])]])
    dec = results.get("decode")
    if dec:
        section("Decode (per photo)", ["full ms", "draft ms", "speed-up", "cos min", "cos mean"],
                [[f(dec["full_ms_per_photo"]), f(dec["fast_ms_per_photo"]),
                  f(dec["speedup"], 2) + "x", f(dec["cosine_fast_vs_full_min"], 5),
                  f(dec["cosine_fast_vs_full_mean"], 5)]])
    fwd = results.get("forward", [])
    rows = []
    for r in fwd:
        if "error" in r:
            rows.append([r["runtime"], r["precision"], "-", "-", "-", "unavailable"])
            continue
        rows.append([r["runtime"], r["precision"], f(r["batch1_ms"]),
                     f(r["batched_photos_per_s"], 2), f(r["cosine_min"], 5),
                     "pass" if r["gate_passed"] else "FAIL"])
    section("Forward alone", ["runtime", "precision", "batch-1 ms", "photos/s batched",
                              "cos min vs fp32", "gate"], rows)
    rows = []
    for svc in results.get("service", []):
        for c, s in svc["concurrency"].items():
            st = s["server_stage_ms_p50"]
            b = s.get("batcher", {})
            ratio = s["photos_per_s"] / seed["photos_per_s"] if seed else float("nan")
            rows.append([_label(svc), c, f(s["photos_per_s"], 2),
                         f(ratio, 2) + "x", f(s["p50_ms"], 0), f(s["p95_ms"], 0),
                         f(s["p99_ms"], 0), f(st["decode_ms"]), f(st["embed_ms"]),
                         f(st["score_ms"], 2), f(b.get("mean_batch_size"), 2)])
    section("Service over gRPC", ["runtime", "conc.", "photos/s", "vs seed", "p50 ms", "p95 ms",
                                  "p99 ms", "decode ms", "embed+queue ms", "score ms",
                                  "mean batch"], rows)
    rows = []
    for svc in results.get("service", []):
        idle = svc.get("idle")
        if idle:
            rows.append([_label(svc), f(idle["bare_forward_ms"]),
                         f(idle["decode_ms"]), f(idle["p50_ms"]), f(idle["vs_forward"], 2),
                         f(idle["small_photo_p50_ms"]), f(idle["small_photo_vs_forward"], 2)])
    section("Idle single photo", ["runtime", "bare fwd ms", "decode ms", "p50 ms", "/fwd",
                                  "small p50 ms", "small /fwd"], rows)
    rows = []
    for size in results.get("gallery", []):
        for c in size["candidates"]:
            rows.append([f"{size['exemplars']:,}", c["index"] + ("" if c["in_gallery"] else " *"),
                         c["nprobe"] or "-", f(c["p50_ms"], 2), f(c["p95_ms"], 2),
                         f(c["recall@10"], 3), f(c["bytes_per_exemplar"], 0)])
    section("Gallery search (one query per call, k=10; * = not offered by the gallery yet)",
            ["exemplars", "index", "nprobe", "p50 ms", "p95 ms", "recall@10", "B/exemplar"],
            rows)
    adds = results.get("adds")
    if adds and "stream_adds_per_s" in adds:
        section("Adds (gRPC, embedding input, durable)",
                ["stream adds/s", "single add p50 ms", "single adds/s", "visible next query"],
                [[f(adds["stream_adds_per_s"], 0), f(adds["single_add_p50_ms"], 2),
                  f(adds["single_adds_per_s"], 0), adds["visible_to_next_query"]]])
    elif adds:
        lines.append(f"\nAdds: skipped ({adds.get('skipped')})")
    start = results.get("start")
    if start and "restart_s" in start:
        section("Server start with a large gallery",
                ["exemplars", "index", "first start s", "restart s"],
                [[f"{start['exemplars']:,}", start["index"], f(start["first_start_s"]),
                  f(start["restart_s"])]])
    elif start:
        lines.append(f"\nStart: skipped ({start.get('skipped')})")
    targets = results.get("targets", [])
    section("Targets", ["target", "goal", "measured", "met"],
            [[t["target"], t["goal"], f(t["measured"], 2), "yes" if t["met"] else "NO"]
             for t in targets])
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local-dir:PATH or hf-hub:ORG/REPO "
                        "(time with `biolit-id demo-model DIR --arch ViT-B-16`)")
    parser.add_argument("--report", action="store_true",
                        help="only print the table of an existing --out file")
    parser.add_argument("--out", type=Path, default=Path("bench-results/bench-results.json"),
                        help="JSON results file (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=Path("bench-results/data"),
                        help="export cache and gallery for the runs (default: %(default)s)")
    parser.add_argument("--update", action="store_true",
                        help="keep the other sections already in --out (run sections apart)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: a smoke run in seconds (numbers meaningless)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma list of: " + ", ".join(SECTIONS))
    parser.add_argument("--photos", type=int, default=8, help="distinct photos per run")
    parser.add_argument("--photo-size", default="4000x3000",
                        help="synthetic JPEG size, WxH (default: a 12-Mpx phone photo)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--runtimes", default=",".join(DEFAULT_RUNTIMES),
                        help="forward section: runtime:precision list")
    parser.add_argument("--service-runtimes", default="auto:auto,openvino:int8",
                        help="service section: runtime:precision list (auto = the default)")
    parser.add_argument("--service-threads", default="0",
                        help="service section: model thread counts to compare (0 = one per "
                             "core); e.g. 0,1 to see decode/model contention on 2 cores")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--per-client", type=int, default=6,
                        help="photos per client per service run")
    parser.add_argument("--gallery-sizes", default="10000,100000,1000000")
    parser.add_argument("--gallery-dim", type=int, default=256,
                        help="vector size in the gallery (256: a bundle's whitened space)")
    parser.add_argument("--gallery-data", choices=("clustered", "uniform"), default="clustered")
    parser.add_argument("--queries", type=int, default=200, help="search queries per index")
    parser.add_argument("--adds", type=int, default=1000, help="adds through gRPC (stream)")
    parser.add_argument("--start-exemplars", type=int, default=1_000_000,
                        help="gallery size for the start-time measurement")


def quick_settings(args: argparse.Namespace) -> None:
    args.photos = min(args.photos, 2)
    args.photo_size = "640x480"
    args.repeats = 1
    args.runtimes = "torch:fp32,onnx:fp32"
    args.service_runtimes = "torch:fp32"
    args.concurrency = "1,2"
    args.per_client = 2
    args.gallery_sizes = "2000"
    args.queries = 10
    args.adds = 10
    args.start_exemplars = 500


def run(args: argparse.Namespace) -> int:
    from biolit_id.server.config import ServerConfig
    from biolit_id.server.embedders.calibration import calibration_pixels, synthetic_photos
    from biolit_id.server.embedders.threads import configure_threads
    from biolit_id.server.model_loader import ModelUnavailableError, load_model

    if args.report:
        results = json.loads(args.out.read_text("utf-8"))
        results["targets"] = evaluate_targets(results)
        print(table(results))
        return 0
    if not args.model:
        print("biolit-id bench: --model is required", file=sys.stderr)
        return 2
    if args.quick:
        quick_settings(args)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        print(f"biolit-id bench: unknown sections {sorted(unknown)}", file=sys.stderr)
        return 2
    try:
        loaded = load_model(args.model)
    except ModelUnavailableError as exc:
        print(f"biolit-id bench: {exc}", file=sys.stderr)
        return 1
    defaults = ServerConfig()
    threads = configure_threads(defaults.model_threads, defaults.search_threads)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    photos = synthetic_photos(args.photos, parse_size(args.photo_size), seed=11)
    small = synthetic_photos(args.photos, (640, 480), seed=12)
    results: dict = {}
    if args.update and args.out.is_file():
        results = json.loads(args.out.read_text("utf-8"))
    results |= {
        "machine": machine(), "threads": threads, "model": args.model,
        "model_fingerprint": loaded.fingerprint, "quick": bool(args.quick),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in {"func"}},
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results.setdefault("runs", []).append({"sections": sorted(sections),
                                           "machine": results["machine"],
                                           "started_at": results["started_at"]})

    def save() -> None:
        results["targets"] = evaluate_targets(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str), "utf-8")

    if "decode" in sections:
        results["decode"] = bench_decode(loaded, photos, args.repeats)
        save()
    if "seed" in sections:
        results["seed"] = bench_seed_path(loaded, photos, args.repeats)
        save()
    if "forward" in sections:
        pixels = calibration_pixels(loaded, None, count=8)
        results["forward"] = bench_forward(loaded, parse_pairs(args.runtimes), args.data_dir,
                                           pixels, args.repeats, batch=8,
                                           single_runs=max(3, 4 * args.repeats))
        save()
    if {"service", "adds"} & sections:
        results["service"] = []
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        configs = [(pair, int(t)) for pair in parse_pairs(args.service_runtimes)
                   for t in args.service_threads.split(",")]
        for i, ((runtime, precision), model_threads) in enumerate(configs):
            # One data dir for all: exports and the auto choice are made once.
            data_dir = args.data_dir / "service"
            shutil.rmtree(data_dir / "gallery", ignore_errors=True)
            running, start_s = start_bench_server(args.model, data_dir, runtime, precision,
                                                  model_threads=model_threads)
            try:
                if "service" in sections:
                    svc = bench_service(running, start_s, photos, small, concurrencies,
                                        args.repeats, args.per_client,
                                        single_runs=max(5, 4 * args.repeats))
                    svc["requested"] = f"{runtime}:{precision}"
                    if "auto" in (runtime, precision):
                        svc["auto_choice"] = auto_record(running.state.model, data_dir,
                                                         runtime, precision)
                    svc["model_threads"] = running.state.config.model_threads or threads[
                        "model_threads"]
                    results["service"].append(svc)
                    save()
                if i == 0 and "adds" in sections:
                    results["adds"] = bench_adds(running, args.adds,
                                                 n_single=max(5, args.adds // 10))
                    save()
            finally:
                running.stop(1.0)
    if "gallery" in sections:
        from biolit_id.cli.bench_gallery import bench_gallery_size

        results["gallery"] = []
        for n in (int(s) for s in args.gallery_sizes.split(",")):
            results["gallery"].append(bench_gallery_size(
                n, args.gallery_dim, args.queries, args.gallery_data,
                search_threads=threads["search_threads"]))
            save()
    if "start" in sections:
        from biolit_id.cli.bench_gallery import bench_start

        results["start"] = bench_start(args.model, args.data_dir / "start",
                                       args.start_exemplars)
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(table(results))
    print(f"results written to {args.out}")
    return 0
