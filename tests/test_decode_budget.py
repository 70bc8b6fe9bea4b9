"""--decode-threads caps how many photos decode at once, over real gRPC."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.inference import pipeline
from conftest import photo_bytes, stub_for


@pytest.fixture
def decodes_at_once(monkeypatch) -> list[int]:
    """The real decode, slowed so that overlapping calls overlap; records the peak."""
    lock, state = threading.Lock(), {"now": 0}
    peaks: list[int] = [0]
    real = pipeline.preprocess

    def counted(data, policy):
        with lock:
            state["now"] += 1
            peaks[0] = max(peaks[0], state["now"])
        try:
            time.sleep(0.05)
            return real(data, policy)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(pipeline, "preprocess", counted)
    return peaks


@pytest.mark.parametrize("limit", [0, 1])
def test_decoders_never_exceed_the_budget(make_server, decodes_at_once, limit):
    stub = stub_for(make_server(decode_threads=limit))
    photos = [photo_bytes(i, "JPEG") for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda p: stub.Identify(pb.IdentifyRequest(image=p)), photos))
    assert all(a.HasField("decision") for a in answers)
    if limit:
        assert decodes_at_once[0] == limit
    else:
        assert decodes_at_once[0] > 1  # unlimited: concurrent calls decode side by side
