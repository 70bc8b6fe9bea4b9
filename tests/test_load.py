"""Load: 12 concurrent Identify clients plus one gallery writer against the demo model.

Two versions share one driver:

* ``test_short_load`` (CI, ~6 s): the server runs in this process, so its RSS
  is this process's (clients included, which only makes the bound stricter).
* ``test_sustained_load`` (``pytest -m slow``, 60 s): the server is a separate
  ``biolit-id serve`` process, and its own RSS is watched.

Both require zero unexpected errors and bounded memory growth, and print
throughput and latency percentiles. They assert no speed: speed targets are
measured by ``biolit-id bench``.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from conftest import photo_bytes

CLIENTS = 12
# Fixed allowance for allocator and thread-stack churn, plus what the writer's
# exemplars legitimately cost in memory (embedding in FAISS and the prototype
# builder, ~2 KB each; thumbnails stay on disk).
RSS_ALLOWANCE_MB = 96
RSS_PER_EXEMPLAR_KB = 16
# Back-pressure answers are the service working as designed, not failures.
EXPECTED_CODES = {grpc.StatusCode.RESOURCE_EXHAUSTED}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class LoadResult:
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    exemplars_added: int = 0
    write_streams: int = 0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self, label: str) -> str:
        n = len(self.latencies_ms)
        return (
            f"{label}: {CLIENTS} clients + 1 writer for {self.seconds:.0f} s: "
            f"{n} Identify OK = {n / self.seconds:.1f}/s, "
            f"p50 {self.percentile(50):.0f} ms, p95 {self.percentile(95):.0f} ms, "
            f"p99 {self.percentile(99):.0f} ms; codes {self.codes}; "
            f"{self.exemplars_added} exemplars added in {self.write_streams} streams; "
            f"RSS {self.rss_start_mb:.0f} -> {self.rss_end_mb:.0f} MB "
            f"(peak {self.rss_peak_mb:.0f})"
        )


def run_load(port: int, server_pid: int, seconds: float, warmup: float) -> LoadResult:
    """Drive the server; RSS is sampled after warm-up (model, caches and pools built)."""
    from biolit_id.server.catalog.catalog import Catalog

    species = Catalog.load_default().names()
    photos = [photo_bytes(1000 + i, "JPEG", (480, 360)) for i in range(24)]
    result = LoadResult(seconds=seconds)
    lock = threading.Lock()
    stop = threading.Event()
    measuring = threading.Event()

    def count(code: grpc.StatusCode, detail: str = "") -> None:
        with lock:
            result.codes[code.name] = result.codes.get(code.name, 0) + 1
            if code != grpc.StatusCode.OK and code not in EXPECTED_CODES:
                result.unexpected.append(f"{code.name}: {detail}")

    def identify_client(index: int, stub) -> None:
        rng = random.Random(index)
        while not stop.is_set():
            request = pb.IdentifyRequest(image=rng.choice(photos), num_similar=3,
                                         request_id=f"c{index}")
            started = time.perf_counter()
            try:
                reply = stub.Identify(request, timeout=30)
            except grpc.RpcError as exc:
                count(exc.code(), exc.details() or "")
                continue
            elapsed = (time.perf_counter() - started) * 1e3
            if reply.request_id != f"c{index}" or not reply.versions.model_id:
                count(grpc.StatusCode.INTERNAL, "malformed reply")
                continue
            count(grpc.StatusCode.OK)
            if measuring.is_set():
                with lock:
                    result.latencies_ms.append(elapsed)

    def writer(stub) -> None:
        rng = random.Random(99)
        while not stop.is_set():
            batch = []
            for _ in range(rng.randint(1, 3)):
                image = photo_bytes(rng.getrandbits(40), "JPEG", (160, 120))
                batch.append(pb.AddExemplarRequest(
                    species=rng.choice(species), image=image,
                    source_uri=f"load://{hashlib.sha256(image).hexdigest()[:12]}"))
            try:
                reply = stub.AddExemplars(iter(batch), timeout=30)
            except grpc.RpcError as exc:
                count(exc.code(), f"AddExemplars: {exc.details()}")
                continue
            with lock:
                result.exemplars_added += len(reply.exemplar_ids)
                result.write_streams += 1

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SpeciesIdentifierStub(channel)
        threads = [threading.Thread(target=identify_client, args=(i, stub), daemon=True)
                   for i in range(CLIENTS)]
        threads.append(threading.Thread(target=writer, args=(stub,), daemon=True))
        for t in threads:
            t.start()
        time.sleep(warmup)
        result.rss_start_mb = result.rss_peak_mb = rss_mb(server_pid)
        measuring.set()
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            time.sleep(min(0.5, seconds / 10))
            result.rss_peak_mb = max(result.rss_peak_mb, rss_mb(server_pid))
        result.seconds = time.monotonic() - began
        stop.set()
        for t in threads:
            t.join(60)
        result.rss_end_mb = rss_mb(server_pid)
        result.rss_peak_mb = max(result.rss_peak_mb, result.rss_end_mb)
    return result


def check(result: LoadResult) -> None:
    assert not result.unexpected, result.unexpected[:10]
    assert result.latencies_ms, "no Identify call succeeded"
    assert result.exemplars_added > 0, "the writer stored nothing"
    bound = RSS_ALLOWANCE_MB + RSS_PER_EXEMPLAR_KB * result.exemplars_added / 1024
    growth = result.rss_end_mb - result.rss_start_mb
    assert growth < bound, f"RSS grew {growth:.0f} MB (bound {bound:.0f} MB)"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc")
def test_short_load(tmp_path: Path, demo_model_spec: str, capsys) -> None:
    from biolit_id.server.app import start_server
    from biolit_id.server.config import ServerConfig

    running = start_server(ServerConfig(model=demo_model_spec, data_dir=tmp_path / "data",
                                        port=0, grace_seconds=1.0))
    try:
        result = run_load(running.port, os.getpid(), seconds=5.0, warmup=1.5)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            info = pb_grpc.SpeciesIdentifierStub(channel).GetServiceInfo(
                pb.GetServiceInfoRequest(), timeout=10)
        assert info.gallery_size == result.exemplars_added  # every acknowledged add is there
    finally:
        running.stop(1.0)
    with capsys.disabled():
        print("\n" + result.summary("short load (in-process server)"))
    check(result)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc")
def test_sustained_load(tmp_path: Path, demo_model_spec: str, capsys) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "biolit_id.cli.main", "serve", "--model", demo_model_spec,
         "--data-dir", str(tmp_path / "data"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=open(tmp_path / "server.log", "w"), text=True,  # noqa: SIM115
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on .*:(\d+)", line)
        assert match, f"server did not start: {line!r}; see {tmp_path / 'server.log'}"
        result = run_load(int(match.group(1)), proc.pid, seconds=60.0, warmup=5.0)
        assert proc.poll() is None, "the server died under load"
    finally:
        proc.terminate()
        proc.wait(30)
    with capsys.disabled():
        print("\n" + result.summary("sustained load (biolit-id serve process)"))
    check(result)
