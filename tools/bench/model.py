"""The model's side of ``biolit-id bench``: decoding, the seed's path, the bare forward.

Measured in this process without a server, so that the service section can
be compared with what the model alone costs on the same photos.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import numpy as np

from biolit_id.cli.bench.common import median_of, timed
from biolit_id.server.inference.embedders.auto import build_embedder
from biolit_id.server.inference.embedders.base import RuntimeUnavailableError
from biolit_id.server.inference.embedders.eager import TorchEmbedder
from biolit_id.server.inference.embedders.gate import (
    GATE_COSINE,
    cosine_rows,
    embed_batched,
    fidelity,
)
from biolit_id.server.inference.preprocess import ImagePolicy, preprocess

log = logging.getLogger(__name__)


def bench_decode(loaded, photos: list[bytes], repeats: int) -> dict:
    """Full vs draft-mode decode, and what the fast path does to embeddings."""
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
