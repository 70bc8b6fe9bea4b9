"""200 idle client streams against a running server: Identify still answers in its time.

Each idle stream is a real IdentifyStream whose client never sends a message
(its request generator blocks), so without a bound every worker thread would
sit waiting on one and a plain Identify would queue behind them forever.
"""

from __future__ import annotations

import statistics
import threading
import time

import grpc
import numpy as np

from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from conftest import stub_for

IDLE_STREAMS = 200
IDLE_TIMEOUT_S = 3.0


def identify_seconds(stub, request: pb.IdentifyRequest, n: int = 5) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        stub.Identify(request, timeout=30)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def test_idle_streams_cannot_starve_identify(make_server) -> None:
    running = make_server(max_workers=8, max_streams=4, stream_idle_timeout_s=IDLE_TIMEOUT_S)
    stub = stub_for(running)
    request = pb.IdentifyRequest(embedding=np.ones(running.state.model.embedding_dim).tolist())
    usual = identify_seconds(stub, request)

    release = threading.Event()

    def never_sends():
        release.wait()  # a client that opened its stream and went quiet
        return
        yield  # a generator that yields nothing

    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    idle_stub = pb_grpc.SpeciesIdentifierStub(channel)
    calls = [idle_stub.IdentifyStream(never_sends(), timeout=120) for _ in range(IDLE_STREAMS)]
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def drain(call) -> None:
        try:
            for _ in call:
                pass
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        with lock:
            outcomes[code] = outcomes.get(code, 0) + 1

    drains = [threading.Thread(target=drain, args=(c,), daemon=True) for c in calls]
    for t in drains:
        t.start()
    try:
        time.sleep(1.0)  # every stream has reached the server
        during = identify_seconds(stub, request)
        assert during < max(0.5, 5 * usual), (usual, during)
        guard = running.state.config.stream_limit
        assert guard == 4
        # Streams beyond the bound were refused at once, not parked on a thread.
        with lock:
            refused = outcomes.get("RESOURCE_EXHAUSTED", 0)
        assert refused >= IDLE_STREAMS - guard
        # The admitted ones are cancelled once idle past the timeout...
        for t in drains:
            t.join(timeout=IDLE_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in drains)
        assert outcomes.get("CANCELLED", 0) == IDLE_STREAMS - refused
        # ...which frees their slots: a real stream works again.
        items = [pb.IdentifyRequest(embedding=np.ones(512).tolist(), request_id=str(i))
                 for i in range(3)]
        answered = list(stub.IdentifyStream(iter(items), timeout=30))
        assert [a.request_id for a in answered] == ["0", "1", "2"]
        assert not any(a.HasField("error") for a in answered)
    finally:
        release.set()
        channel.close()


def test_a_busy_stream_is_not_idle(make_server) -> None:
    """Only waiting for the client counts: a slow sender under the timeout is served."""
    running = make_server(max_streams=2, stream_idle_timeout_s=1.5)
    stub = stub_for(running)

    def slow_sender():
        for i in range(4):
            time.sleep(0.8)  # each gap under the idle timeout, the whole stream over it
            yield pb.IdentifyRequest(embedding=np.ones(512).tolist(), request_id=str(i))

    answered = list(stub.IdentifyStream(slow_sender(), timeout=30))
    assert [a.request_id for a in answered] == ["0", "1", "2", "3"]
