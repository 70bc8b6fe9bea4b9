"""Access logs (one JSON line per call, nothing sensitive) and Prometheus metrics."""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.request

import grpc
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.grpc.observability import access_log, configure_access_log
from conftest import photo_bytes, stub_for

MARKER = "SECRET-MARKER-7f3a"


@pytest.fixture(scope="module")
def observed_server(tmp_path_factory, demo_model_spec: str):
    from biolit_id.server.app import start_server
    from biolit_id.server.config import ServerConfig

    config = ServerConfig(model=demo_model_spec, data_dir=tmp_path_factory.mktemp("data"),
                          port=0, grace_seconds=0.5, metrics_port=0)
    running = start_server(config)
    yield running
    running.stop(0.5)


def scrape(running) -> dict[tuple[str, tuple], float]:
    """All samples from the /metrics endpoint, keyed by (name, sorted labels)."""
    url = f"http://127.0.0.1:{running.metrics.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def marked_photo() -> bytes:
    """A PNG whose bytes carry a recognisable text chunk."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", MARKER)
    out = io.BytesIO()
    Image.open(io.BytesIO(photo_bytes(3, "PNG", (64, 48)))).save(out, "PNG", pnginfo=info)
    return out.getvalue()


def access_records(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "biolit.access"]


def test_one_json_line_per_call_without_request_content(observed_server, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    stub = stub_for(observed_server)
    photo = marked_photo()
    assert MARKER.encode() in photo
    walls_ms = []  # each call as the client timed it: the server's latency lies within
    started = time.perf_counter()
    stub.Identify(pb.IdentifyRequest(image=photo, request_id=MARKER), timeout=30)
    walls_ms.append((time.perf_counter() - started) * 1e3)
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError):
        stub.Identify(pb.IdentifyRequest(image=b"\x89PNG junk " + MARKER.encode()), timeout=30)
    walls_ms.append((time.perf_counter() - started) * 1e3)
    started = time.perf_counter()
    replies = list(stub.IdentifyStream(iter([pb.IdentifyRequest(image=photo)] * 3), timeout=30))
    walls_ms.append((time.perf_counter() - started) * 1e3)
    assert len(replies) == 3

    records = access_records(caplog)
    assert [(r["method"], r["code"]) for r in records] == [
        ("Identify", "OK"), ("Identify", "INVALID_ARGUMENT"), ("IdentifyStream", "OK"),
    ]
    for record, wall_ms in zip(records, walls_ms, strict=True):
        assert record["service"] == "biolit.v1.SpeciesIdentifier"
        assert 0 < record["latency_ms"] <= wall_ms + 0.01, (record, wall_ms)  # 0.01: rounding
        assert record["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
        assert record["ts"].endswith("+00:00")
    assert records[1]["details"]  # failures say why
    assert records[2]["responses"] == 3
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert MARKER not in everything  # no photo bytes, no request fields


def test_metrics_endpoint_counts_calls_by_method_and_code(observed_server) -> None:
    stub = stub_for(observed_server)
    before = scrape(observed_server)

    def count(samples, method: str, code: str) -> float:
        return samples.get(("biolit_requests_total",
                            (("code", code), ("method", method))), 0.0)

    def observations(samples, method: str) -> float:
        return samples.get(("biolit_request_duration_seconds_count", (("method", method),)),
                           0.0)

    for seed in (1, 2):
        stub.Identify(pb.IdentifyRequest(image=photo_bytes(seed)), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Identify(pb.IdentifyRequest(image=b"junk"), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.GetSpecies(pb.GetSpeciesRequest(scientific_name="Nonexistent species"))
    info = stub.GetServiceInfo(pb.GetServiceInfoRequest())

    after = scrape(observed_server)
    assert count(after, "Identify", "OK") - count(before, "Identify", "OK") == 2
    assert count(after, "Identify", "INVALID_ARGUMENT") - \
        count(before, "Identify", "INVALID_ARGUMENT") == 1
    assert count(after, "GetSpecies", "NOT_FOUND") - count(before, "GetSpecies", "NOT_FOUND") == 1
    assert observations(after, "Identify") - observations(before, "Identify") == 3
    assert after[("biolit_gallery_size", ())] == info.gallery_size
    assert after[("biolit_model_load_seconds", ())] > 0
    # Every call has returned: no image waits for the model, no call is being handled.
    assert after[("biolit_queue_depth", ())] == 0
    assert after[("biolit_requests_in_flight", ())] == 0
    service = [k for k in after if k[0] == "biolit_service_info"]
    assert service and dict(service[0][1])["model"] == info.model_id


def test_queue_depth_gauge_reads_the_batcher(observed_server) -> None:
    import numpy as np

    batcher = observed_server.state.batcher
    busy = batcher.submit_async(np.zeros((64, 3, 224, 224), dtype=np.float32))
    while batcher.queue_depth:  # the model has taken the big batch ...
        time.sleep(0.001)
    waiting = [batcher.submit_async(np.zeros((1, 3, 224, 224), dtype=np.float32))
               for _ in range(3)]  # ... and these wait behind it
    depth = scrape(observed_server)[("biolit_queue_depth", ())]
    pending = sum(not w.done() for w in waiting)
    busy.result(60)
    for w in waiting:
        w.result(60)
    assert depth >= pending  # sampled while they were queued
    assert depth <= 3


def test_health_checks_are_logged_quietly(observed_server, caplog) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    caplog.set_level(logging.INFO, logger="biolit.access")
    with grpc.insecure_channel(f"127.0.0.1:{observed_server.port}") as ch:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    assert not access_records(caplog)  # DEBUG level only: probes would drown the log


def test_serve_writes_bare_json_lines() -> None:
    stream = io.StringIO()
    saved = (list(access_log.handlers), access_log.propagate, access_log.level,
             getattr(access_log, "_biolit_configured", False))
    try:
        access_log._biolit_configured = False  # type: ignore[attr-defined]
        configure_access_log(stream)
        access_log.info(json.dumps({"event": "rpc", "method": "Identify"}))
    finally:
        access_log.handlers[:] = saved[0]
        access_log.propagate, access_log.level = saved[1], saved[2]
        access_log._biolit_configured = saved[3]  # type: ignore[attr-defined]
    line = stream.getvalue().strip()
    assert json.loads(line) == {"event": "rpc", "method": "Identify"}


def test_json_api_calls_have_their_own_metrics_and_access_lines(tmp_path, demo_model_spec,
                                                                caplog) -> None:
    import requests

    from biolit_id.server.app import start_server
    from biolit_id.server.config import ServerConfig

    running = start_server(ServerConfig(model=demo_model_spec, data_dir=tmp_path, port=0,
                                        http_port=0, grace_seconds=0.5, metrics_port=0))
    try:
        base = running.http.url
        with caplog.at_level("INFO", logger="biolit.access"):
            ok = requests.post(f"{base}v1/identify", timeout=30,
                               files={"image": ("p.jpg", photo_bytes(4), "image/jpeg")})
            bad = requests.post(f"{base}v1/identify", timeout=30,
                                files={"image": ("p.jpg", b"junk", "image/jpeg")})
        assert ok.status_code == 200 and bad.status_code == 400
        after = scrape(running)
        for code in ("OK", "INVALID_ARGUMENT"):
            assert after[("biolit_http_requests_total",
                          (("code", code), ("method", "Identify")))] == 1
        assert after[("biolit_http_request_duration_seconds_count",
                      (("method", "Identify"),))] == 2
        # HTTP calls are not counted as gRPC calls.
        assert ("biolit_requests_total", (("code", "OK"), ("method", "Identify"))) not in after
        lines = [r for r in access_records(caplog) if r["event"] == "http"]
        assert [r["code"] for r in lines] == ["OK", "INVALID_ARGUMENT"]
        assert "details" in lines[1] and "details" not in lines[0]
    finally:
        running.stop(0.5)
