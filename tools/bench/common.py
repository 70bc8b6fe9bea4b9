"""What every ``biolit-id bench`` section shares: timing helpers, the machine, a bench server.

Kept apart so that section modules (model, gRPC, gallery) import it and
nothing imports the command-line module back.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np

from biolit_id.server.app import RunningServer, start_server
from biolit_id.server.config import ServerConfig
from biolit_id.server.inference.embedders.hardware import (
    cpu_has_amx_int8,
    cpu_has_bf16,
    cpu_identity,
)
from biolit_id.server.inference.embedders.threads import available_cores


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
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {"cpu": cpu_identity(), "cores": available_cores(), "bf16": cpu_has_bf16(),
            "amx": cpu_has_amx_int8(),
            "python": platform.python_version(), "load_average_at_start": load}


def client_channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", 64 << 20),
                 ("grpc.max_receive_message_length", 64 << 20)],
    )


def start_bench_server(spec: str, data_dir: Path, runtime: str, precision: str,
                       **overrides) -> tuple[RunningServer, float]:
    """A real server on a free loopback port, and how long it took to start."""
    config = ServerConfig(model=spec, data_dir=data_dir, port=0, runtime=runtime,
                          precision=precision, grace_seconds=1.0,
                          max_message_bytes=64 << 20)
    for key, value in overrides.items():
        setattr(config, key, value)
    t0 = time.perf_counter()
    running = start_server(config)
    return running, time.perf_counter() - t0
