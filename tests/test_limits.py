"""Size limits, deadlines and backpressure over real gRPC on loopback."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.grpc.limits import (
    MAX_EMBEDDING_VALUES,
    MAX_LIST_LENGTH,
    MAX_METADATA_LENGTH,
    MAX_NAME_LENGTH,
    RequestLimitError,
    check_request,
)
from conftest import code_of, photo_bytes, stub_for


def assert_serving(running) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, demo_model_spec: str):
    """One worker, a 256-KiB message cap and a one-photo model queue."""
    from biolit_id.server.app import start_server
    from biolit_id.server.config import ServerConfig

    config = ServerConfig(
        model=demo_model_spec, data_dir=tmp_path_factory.mktemp("data"), port=0,
        grace_seconds=0.5, max_workers=1, max_message_bytes=256 * 1024,
        max_batch_size=1, max_queue_size=1, max_image_pixels=4_000_000,
    )
    running = start_server(config)
    yield running
    running.stop(0.5)


# ------------------------------------------------------------ field limits


def test_check_request_names_the_field_and_limit() -> None:
    with pytest.raises(RequestLimitError, match=rf"restrict_to\[1\] .* at most {MAX_NAME_LENGTH}"):
        check_request(pb.IdentifyRequest(restrict_to=["Fucus", "F" * (MAX_NAME_LENGTH + 1)]))
    with pytest.raises(RequestLimitError, match="request_id"):
        check_request(pb.IdentifyRequest(request_id="r" * (MAX_METADATA_LENGTH + 1)))
    with pytest.raises(RequestLimitError, match="exemplar_ids has"):
        check_request(pb.RemoveExemplarsRequest(exemplar_ids=range(MAX_LIST_LENGTH + 1)))
    with pytest.raises(RequestLimitError, match="embedding has"):
        check_request(pb.IdentifyRequest(embedding=[0.1] * (MAX_EMBEDDING_VALUES + 1)))
    with pytest.raises(RequestLimitError, match=r"taxonomy\.vernacular_names\[0\]\.name"):
        check_request(pb.AddSpeciesRequest(taxonomy=pb.Taxonomy(
            vernacular_names=[pb.VernacularName(name="n" * 300, language="fr")])))
    with pytest.raises(RequestLimitError, match="NUL"):
        check_request(pb.AddExemplarRequest(species="Fucus\x00 serratus"))
    # At the limit is fine; bytes fields are not limited here (the message cap is).
    check_request(pb.AddExemplarRequest(species="F" * MAX_NAME_LENGTH,
                                        source_uri="u" * MAX_METADATA_LENGTH,
                                        image=b"\xff" * 100_000))


def test_over_long_fields_are_invalid_argument(small_server) -> None:
    stub = stub_for(small_server)
    cases = {
        "restrict_to[0]": pb.IdentifyRequest(image=photo_bytes(1), restrict_to=["x" * 5000]),
        "request_id": pb.IdentifyRequest(image=photo_bytes(1), request_id="r" * 5000),
        "embedding": pb.IdentifyRequest(embedding=[0.5] * (MAX_EMBEDDING_VALUES + 10)),
    }
    for field, request in cases.items():
        err = rpc_error(lambda r=request: stub.Identify(r, timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in err.details()
        assert len(err.details()) < 300  # the oversized value is not echoed back
    err = rpc_error(lambda: stub.GetSpecies(pb.GetSpeciesRequest(scientific_name="s" * 10_000)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = rpc_error(lambda: stub.ListSpecies(pb.ListSpeciesRequest(taxon="t" * 10_000)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = rpc_error(lambda: stub.Identify(
        pb.IdentifyRequest(image=photo_bytes(1), restrict_to=["Fucus"] * 501), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "restrict_to" in err.details()
    assert_serving(small_server)


def test_stream_reports_an_over_long_item_and_goes_on(small_server) -> None:
    stub = stub_for(small_server)
    requests = [
        pb.IdentifyRequest(image=photo_bytes(2), request_id="ok-1"),
        pb.IdentifyRequest(image=photo_bytes(3), restrict_to=["y" * 1000], request_id="long"),
        pb.IdentifyRequest(image=photo_bytes(4), request_id="ok-2"),
    ]
    # A one-photo queue may turn a read-ahead photo away: retry those, as a client would.
    replies = list(stub.IdentifyStream(iter(requests), timeout=60))
    assert [r.request_id for r in replies] == ["ok-1", "long", "ok-2"]
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "restrict_to[0]" in replies[1].error.message
    for reply in (replies[0], replies[2]):
        assert reply.error.code in (0, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


def test_quotes_and_sql_fragments_are_plain_names(small_server) -> None:
    stub = stub_for(small_server)
    for name in ("Robert'); DROP TABLE exemplars;--", 'Fucus "serratus"', "' OR '1'='1"):
        err = rpc_error(lambda n=name: stub.GetSpecies(pb.GetSpeciesRequest(scientific_name=n)))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert name in err.details()  # echoed literally, not interpreted
    # The catalog is intact afterwards.
    assert len(stub.ListSpecies(pb.ListSpeciesRequest()).species) >= 100


# ---------------------------------------------------------- message size


def test_message_over_the_cap_is_resource_exhausted(small_server) -> None:
    stub = stub_for(small_server)
    big = photo_bytes(5, fmt="PNG", size=(400, 300))  # noisy PNG: ~350 KB
    assert len(big) > 256 * 1024
    err = rpc_error(lambda: stub.Identify(pb.IdentifyRequest(image=big), timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serving(small_server)
    assert stub.Identify(pb.IdentifyRequest(image=photo_bytes(6)), timeout=30).versions.model_id


def test_service_info_reports_the_limits(small_server) -> None:
    limits = stub_for(small_server).GetServiceInfo(pb.GetServiceInfoRequest()).limits
    assert limits.max_message_bytes == 256 * 1024
    assert limits.max_image_pixels == 4_000_000
    assert limits.max_queue_size == 1
    assert limits.max_batch_size == 1


# ------------------------------------------------------ deadlines, queues


def wait_until_busy(running, calls: int = 1) -> None:
    """Until ``calls`` handlers run (the single worker is taken), whatever the machine load."""
    give_up = time.monotonic() + 20
    while running.metrics.in_flight._value.get() < calls:
        assert time.monotonic() < give_up, "the blocking call never started"
        time.sleep(0.01)


class Gate:
    """A request stream that holds the server's only worker until opened."""

    def __init__(self) -> None:
        self.opened = threading.Event()

    def requests(self) -> Iterator[pb.IdentifyRequest]:
        self.opened.wait(30)
        return
        yield  # pragma: no cover


def test_expired_calls_are_dropped_not_done(small_server, caplog) -> None:
    """Calls that wait past their deadline (the only worker is busy) are never run.

    gRPC itself drops a unary call cancelled before a worker picks it up; the
    guard interceptor drops request streams, which gRPC would start anyway.
    """
    caplog.set_level(logging.INFO, logger="biolit.access")
    stub = stub_for(small_server)
    dropped = small_server.metrics.deadline_dropped.labels("IdentifyStream")
    dropped_before = dropped._value.get()
    embedded_before = small_server.state.batcher.stats.rows
    gate = Gate()
    hold = threading.Thread(target=lambda: list(stub.IdentifyStream(gate.requests(), timeout=30)))
    hold.start()
    try:
        wait_until_busy(small_server)
        unary = stub.Identify.future(pb.IdentifyRequest(image=photo_bytes(7)), timeout=0.3)
        stream = stub.IdentifyStream(iter([pb.IdentifyRequest(image=photo_bytes(8))] * 2),
                                     timeout=0.3)
        assert rpc_error(unary.result).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert rpc_error(lambda: list(stream)).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        gate.opened.set()
        hold.join(10)
    # Queued behind the two expired calls: when it is answered, they have been handled.
    assert stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10).model_id
    assert dropped._value.get() == dropped_before + 1
    assert small_server.state.batcher.stats.rows == embedded_before  # nothing was embedded
    handled = [json.loads(r.getMessage()) for r in caplog.records if r.name == "biolit.access"]
    assert not [h for h in handled if h["method"] == "Identify"]  # never started
    assert [h["code"] for h in handled if h["method"] == "IdentifyStream"][-1] == \
        "DEADLINE_EXCEEDED"
    assert_serving(small_server)


def test_concurrency_cap_answers_resource_exhausted_fast(small_server) -> None:
    """max_workers * 16 calls may be in the server; the next is refused at once."""
    stub = stub_for(small_server)
    gate = Gate()
    cap = small_server.state.config.max_workers * 16
    holders = [stub.IdentifyStream(gate.requests(), timeout=30) for _ in range(cap)]
    pumps = [threading.Thread(target=lambda h=h: list(h)) for h in holders]
    for pump in pumps:
        pump.start()
    wait_until_busy(small_server)
    try:
        # Until all the holders have arrived, a probe is queued (and expires) instead;
        # once the server holds its maximum, the next call is refused at once.
        codes = []
        for _ in range(50):
            codes.append(code_of(lambda: stub.GetServiceInfo(pb.GetServiceInfoRequest(),
                                                             timeout=0.2)))
            if codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, codes
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED,
                              grpc.StatusCode.DEADLINE_EXCEEDED}
    finally:
        gate.opened.set()
        for pump in pumps:
            pump.join(10)
    assert_serving(small_server)


def test_full_model_queue_is_resource_exhausted(small_server) -> None:
    """A photo beyond max_queue_size is turned away instead of waiting without bound.

    The queue is filled for real: a large batch keeps the model busy and one
    photo waits behind it (max_queue_size=1), so the next Identify cannot queue.
    """
    batcher = small_server.state.batcher
    stub = stub_for(small_server)
    busy = np.zeros((128, 3, 224, 224), dtype=np.float32)
    filler = np.zeros((1, 3, 224, 224), dtype=np.float32)
    codes = []
    for _attempt in range(3):
        running = batcher.submit_async(busy)
        while batcher.queue_depth:  # wait until the model has taken the big batch
            time.sleep(0.001)
        waiting = batcher.submit_async(filler)
        try:
            stub.Identify(pb.IdentifyRequest(image=photo_bytes(8)), timeout=30)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queue_size 1" in exc.details()
        still_busy = not waiting.done()
        running.result(60)
        waiting.result(60)
        if codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED or still_busy:
            break
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, codes
    assert_serving(small_server)
    assert stub.Identify(pb.IdentifyRequest(image=photo_bytes(9)), timeout=30).versions.model_id


# ------------------------------------------------------- gallery strings

SQLISH = "Robertus tablesii'); DROP TABLE exemplars;--"
NAME = "Robertus tablesii"
LITERALS = {
    "source_uri": "https://example.org/x?id=1' OR '1'='1",
    "license": 'CC-BY "4.0"; DELETE FROM species; --',
    "contributor": "O'Brien \\ \"Bobby\" 🦀 %s %(x)s ?",
    "observation_id": "1; UPDATE exemplars SET species='x'",
}


def test_names_with_quotes_and_sql_are_stored_literally(small_server) -> None:
    stub = stub_for(small_server)
    # A name is checked against the grammar of names first (server/catalog/names.py).
    err = rpc_error(lambda: stub.AddSpecies(pb.AddSpeciesRequest(scientific_name=SQLISH),
                                            timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a scientific name" in \
        err.details()
    assert code_of(lambda: stub.GetSpecies(pb.GetSpeciesRequest(scientific_name=SQLISH))) == \
        grpc.StatusCode.NOT_FOUND
    # Free-text fields keep quotes and SQL as they are.
    created = stub.AddSpecies(pb.AddSpeciesRequest(
        scientific_name=NAME, description="it's a \"test\"; --",
        taxonomy=pb.Taxonomy(lineage=[
            pb.Taxon(rank=pb.RANK_KINGDOM, name="Animalia"),
            pb.Taxon(rank=pb.RANK_GENUS, name="Robertus"),
        ]),
    ), timeout=30)
    assert created.scientific_name == NAME and created.description == "it's a \"test\"; --"
    reply = stub.AddExemplars(iter([
        pb.AddExemplarRequest(species=NAME, embedding=[0.25] * 512, **LITERALS),
        pb.AddExemplarRequest(species="Carcinus maenas", embedding=[-0.5] * 512, **LITERALS),
    ]), timeout=30)
    assert len(reply.exemplar_ids) == 2
    listed = stub.ListExemplars(pb.ListExemplarsRequest(species=NAME)).exemplars
    assert [e.exemplar_id for e in listed] == [reply.exemplar_ids[0]]
    for field, value in LITERALS.items():
        assert getattr(listed[0], field) == value
    # Both rows, and the tables they would have dropped, are intact.
    everything = stub.ListExemplars(pb.ListExemplarsRequest(page_size=1000))
    assert set(reply.exemplar_ids) <= {e.exemplar_id for e in everything.exemplars}
    assert any(s.scientific_name == NAME
               for s in stub.ListSpecies(pb.ListSpeciesRequest()).species)


def test_over_long_gallery_fields_are_invalid_argument(small_server) -> None:
    stub = stub_for(small_server)
    before = stub.ListExemplars(pb.ListExemplarsRequest(page_size=1000)).total_count
    err = rpc_error(lambda: stub.AddExemplars(iter([
        pb.AddExemplarRequest(species="Carcinus maenas", embedding=[0.75] * 512),
        pb.AddExemplarRequest(species="Carcinus maenas", embedding=[0.5] * 512,
                              contributor="c" * (MAX_METADATA_LENGTH + 1)),
    ]), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 1" in err.details() and "contributor" in err.details()
    # Stream semantics: the message before the bad one is stored, the bad one is not.
    assert stub.ListExemplars(pb.ListExemplarsRequest(page_size=1000)).total_count == before + 1

    cases = {
        "scientific_name": lambda: stub.AddSpecies(
            pb.AddSpeciesRequest(scientific_name="S" * (MAX_NAME_LENGTH + 1))),
        "description": lambda: stub.AddSpecies(
            pb.AddSpeciesRequest(scientific_name="Longus descriptus", description="d" * 9000)),
        "vernacular_names": lambda: stub.AddSpecies(pb.AddSpeciesRequest(
            scientific_name="Multus nominatus",
            vernacular_names=[pb.VernacularName(name="n", language="en")] * 1001)),
        "exemplar_ids": lambda: stub.RemoveExemplars(
            pb.RemoveExemplarsRequest(exemplar_ids=range(1, MAX_LIST_LENGTH + 2))),
        "species": lambda: stub.SearchSimilar(
            pb.SearchSimilarRequest(embedding=[1.0] * 512, species="x" * 1000)),
        "page_token": lambda: stub.ListExemplars(
            pb.ListExemplarsRequest(page_token="t" * (MAX_METADATA_LENGTH + 1))),
    }
    for field, call in cases.items():
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in err.details(), (field, err.details())
    assert_serving(small_server)
