"""Milvus stopped and restarted under a running biolit-id (``milvus-lite server``, a real server).

While it is away Identify answers from the prototypes in memory (without
similar photos), curation fails fast with UNAVAILABLE and a retry hint; once
it is back everything resumes by itself, and nothing acknowledged is lost.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from biolit_id.index.milvus.server import EmbeddedMilvus, MilvusServerUnavailable
from biolit_id.proto import identification_pb2 as pb
from conftest import stub_for

SPECIES = "Carcinus maenas"


class MilvusProcess:
    """``milvus-lite server`` on a fixed port and data dir, so it can come back."""

    def __init__(self, data_dir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir),
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    pytest.fail("milvus-lite server did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(params=["lite", "server"])
def milvus(request, tmp_path: Path):
    """``milvus-lite server``, or a real Milvus standalone server of its own (restarted
    on the same directory and ports)."""
    if request.param == "lite":
        server = MilvusProcess(tmp_path / "milvus")
    else:
        try:
            server = EmbeddedMilvus(tmp_path / "milvus-server")
        except MilvusServerUnavailable as exc:
            pytest.skip(f"real-Milvus variant skipped: {exc}")
    server.start()
    yield server
    server.stop()


def add(rng: np.random.Generator, n: int = 1) -> list[pb.AddExemplarRequest]:
    return [pb.AddExemplarRequest(species=SPECIES, embedding=rng.normal(size=512).tolist())
            for _ in range(n)]


def timed_failure(call) -> tuple[grpc.RpcError, float]:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value, time.monotonic() - started


def test_milvus_away_and_back(milvus, make_server, tmp_path):
    running = make_server(gallery=f"milvus://127.0.0.1:{milvus.port}/faults",
                          data_dir=tmp_path / "data")
    stub = stub_for(running)
    rng = np.random.default_rng(0)
    acknowledged = list(stub.AddExemplars(iter(add(rng, 3))).exemplar_ids)
    query = pb.IdentifyRequest(embedding=np.cos(np.arange(512)).tolist(), num_similar=3)
    before = stub.Identify(query, timeout=10)
    assert len(before.similar) == 3

    milvus.stop()
    # Identify answers from the prototypes it holds: same decision, no similar photos.
    during = stub.Identify(query, timeout=10)
    assert during.decision.species == before.decision.species
    assert [c.species for c in during.prototype_candidates] == \
        [c.species for c in before.prototype_candidates]
    assert len(during.similar) == 0
    # Curation fails fast, UNAVAILABLE, with a retry hint (message and trailing metadata).
    for call in (lambda: stub.AddExemplars(iter(add(rng)), timeout=20),
                 lambda: stub.ListExemplars(pb.ListExemplarsRequest(), timeout=20),
                 lambda: stub.SearchSimilar(pb.SearchSimilarRequest(exemplar_id=acknowledged[0],
                                                                    k=2), timeout=20)):
        error, seconds = timed_failure(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "retry" in error.details()
        assert ("retry-after-s", "2") in tuple(error.trailing_metadata())
        assert seconds < 5.0

    milvus.start()
    # Resumes by itself: no restart of biolit-id, the client's retries succeed. A real
    # server reloads its collections after a restart, which takes a while: a call may
    # run out of its deadline meanwhile.
    back = time.monotonic()
    deadline = back + (60 if isinstance(milvus, MilvusProcess) else 180)
    waiting = {grpc.StatusCode.UNAVAILABLE} | (
        set() if isinstance(milvus, MilvusProcess) else {grpc.StatusCode.DEADLINE_EXCEEDED})
    timed_out = 0  # calls that ran out of time: their photo may still have been stored
    while True:
        try:
            later = stub.AddExemplars(iter(add(rng)), timeout=20).exemplar_ids[0]
            break
        except grpc.RpcError as exc:
            assert exc.code() in waiting, exc.details()
            timed_out += exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() < deadline, "Milvus came back but curation did not resume"
            time.sleep(0.5)
    print(f"\ncuration resumed {time.monotonic() - back:.1f} s after Milvus answered again")
    listed = stub.ListExemplars(pb.ListExemplarsRequest(species=SPECIES, page_size=100))
    ids = {e.exemplar_id for e in listed.exemplars}
    assert set(acknowledged) | {later} <= ids  # nothing acknowledged is lost
    assert 4 <= listed.total_count <= 4 + timed_out
    assert len(stub.Identify(query, timeout=10).similar) == 3
