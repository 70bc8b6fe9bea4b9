"""OpenVINO's throughput mode as an ``auto`` candidate, and int8 as one on AMX CPUs.

Real OpenVINO on the tiny random demo model: the throughput embedder must
be the same model as torch fp32 (within the gate) for any batch size, and
``auto`` must gate and time it next to the others. int8 on AMX can only be
exercised here through the selection logic, with the CPU's flags injected.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from biolit_id.cli.main import main as cli_main
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.inference.embedders import hardware
from biolit_id.server.inference.embedders.auto import (
    AUTO_CANDIDATES,
    eligible_candidates,
    resolve_auto,
    service_cost,
    time_forward,
)
from biolit_id.server.inference.embedders.calibration import calibration_pixels
from biolit_id.server.inference.embedders.factory import make_embedder
from biolit_id.server.inference.embedders.gate import GATE_COSINE, fidelity
from conftest import photo_folder, stub_for

pytest.importorskip("openvino", reason="install biolit-id[openvino] for OpenVINO")

INTEL_AMX_FLAGS = "fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
AVX2_FLAGS = "fpu sse2 avx2 fma"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ov-throughput-cache")


def _fake_cpu(monkeypatch, tmp_path: Path, flags: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)


def test_throughput_mode_is_the_same_model_for_any_batch(loaded_demo_model, cache_dir):
    pixels = calibration_pixels(loaded_demo_model, count=7)
    reference = make_embedder(loaded_demo_model, "torch", "fp32").embed(pixels)
    embedder = make_embedder(loaded_demo_model, "openvino-throughput", "fp32", cache_dir)
    assert (embedder.runtime, embedder.precision) == ("openvino-throughput", "fp32")
    assert embedder.requests >= 1 and embedder.streams >= 1
    # Batches larger, equal and smaller than the number of requests, rows kept in order.
    for rows in (slice(0, 7), slice(0, embedder.requests), slice(2, 3)):
        out = embedder.embed(pixels[rows])
        assert out.shape == reference[rows].shape
        assert fidelity(reference[rows], out, embedder.runtime, "fp32").cosine_min > GATE_COSINE
    np.testing.assert_allclose(np.linalg.norm(embedder.embed(pixels), axis=1), 1.0, atol=1e-5)
    latency = make_embedder(loaded_demo_model, "openvino", "fp32", cache_dir)
    assert latency.streams == 1
    np.testing.assert_allclose(embedder.embed(pixels), latency.embed(pixels), atol=1e-4)


def test_auto_gates_and_times_the_throughput_mode(loaded_demo_model, cache_dir):
    candidates = [("openvino", "fp32"), ("openvino-throughput", "fp32"), ("torch", "fp32")]
    embedder, choice = resolve_auto(loaded_demo_model, "auto", "fp32", cache_dir,
                                    candidates=candidates, batch=4)
    gated = {(g.runtime, g.precision): g for g in choice.gates}
    assert gated[("openvino-throughput", "fp32")].passed
    assert gated[("openvino-throughput", "fp32")].cosine_min >= GATE_COSINE
    timed = choice.ms_per_photo
    assert set(timed) == {"openvino fp32", "openvino-throughput fp32", "torch fp32"}
    assert all(t > 0 for t in timed.values()) and choice.batch == 4
    assert timed[f"{embedder.runtime} {embedder.precision}"] == min(timed.values())
    # Recorded per batch size: another batch size measures again.
    _, again = resolve_auto(loaded_demo_model, "auto", "fp32", cache_dir,
                            candidates=candidates, batch=4)
    assert again.reused and again.ms_per_photo == timed
    _, other = resolve_auto(loaded_demo_model, "auto", "fp32", cache_dir,
                            candidates=candidates, batch=2)
    assert not other.reused and other.batch == 2


def test_a_throughput_mode_that_fails_the_gate_is_not_kept(loaded_demo_model, cache_dir):
    embedder, choice = resolve_auto(
        loaded_demo_model, "openvino-throughput", "fp32", cache_dir,
        candidates=[("openvino-throughput", "fp32")], threshold=1.01)
    assert [g.runtime for g in choice.gates] == ["openvino-throughput"]
    assert not choice.gates[0].passed and choice.ms_per_photo == {}
    assert embedder.runtime == "openvino-throughput"  # pinned: nothing else to fall back to


def test_int8_is_an_auto_candidate_only_on_amx(monkeypatch, tmp_path):
    _fake_cpu(monkeypatch, tmp_path, AVX2_FLAGS)
    plain = eligible_candidates("auto", "auto", AUTO_CANDIDATES)
    assert not any(p == "int8" for _, p in plain)
    assert not any(p == "bf16" for _, p in plain)
    assert ("openvino-throughput", "fp32") in plain
    _fake_cpu(monkeypatch, tmp_path, INTEL_AMX_FLAGS)
    amx = eligible_candidates("auto", "auto", AUTO_CANDIDATES)
    for cand in [("openvino", "int8"), ("openvino-throughput", "int8"), ("onnx", "int8"),
                 ("openvino-throughput", "bf16")]:
        assert cand in amx
    # A pinned precision still wins over the CPU.
    assert {p for _, p in eligible_candidates("auto", "fp32", AUTO_CANDIDATES)} == {"fp32"}
    # AVX512-VNNI without AMX: int8 stays opt-in.
    _fake_cpu(monkeypatch, tmp_path, "avx2 avx512f avx512_vnni")
    assert not any(p == "int8" for _, p in eligible_candidates("auto", "auto", AUTO_CANDIDATES))
    assert any(p == "int8" for _, p in eligible_candidates("auto", "int8", AUTO_CANDIDATES))


def test_int8_on_amx_goes_through_the_gate(loaded_demo_model, monkeypatch, tmp_path):
    _fake_cpu(monkeypatch, tmp_path, INTEL_AMX_FLAGS)
    pytest.importorskip("onnxruntime", reason="install biolit-id[onnx] for ONNX Runtime")
    _, choice = resolve_auto(loaded_demo_model, "auto", "auto", tmp_path / "cache",
                             candidates=[("onnx", "int8"), ("torch", "fp32")], batch=2)
    # Considered without --precision int8, and judged by the same gate as the others.
    assert [(g.runtime, g.precision) for g in choice.gates] == [("onnx", "int8")]
    assert ("onnx int8" in choice.ms_per_photo) == choice.gates[0].passed


def test_check_runtime_accepts_the_throughput_mode(demo_model_spec, cache_dir, tmp_path,
                                                  capsys):
    photos = photo_folder(tmp_path / "photos", 3, seed=4)
    report = tmp_path / "report.json"
    assert cli_main(["check-runtime", "--model", demo_model_spec, "--images", str(photos),
                     "--runtime", "openvino-throughput", "--precision", "fp32",
                     "--data-dir", str(cache_dir), "--json", str(report)]) == 0
    assert "openvino-throughput fp32 vs torch fp32" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["runtime"] == "openvino-throughput" and data["passed"]
    assert data["streams"] >= 1 and data["cosine_min"] > GATE_COSINE


def test_service_reports_the_throughput_runtime(make_server, cache_dir):
    running = make_server(runtime="openvino-throughput", precision="fp32", data_dir=cache_dir)
    info = stub_for(running).GetServiceInfo(pb.GetServiceInfoRequest())
    assert (info.runtime, info.precision) == ("openvino-throughput", "fp32")


class _Timed:
    """An embedder whose cost is a fixed part per call plus a part per photo."""

    def __init__(self, per_call_ms: float, per_photo_ms: float) -> None:
        self.per_call_s, self.per_photo_s = per_call_ms / 1e3, per_photo_ms / 1e3

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        time.sleep(self.per_call_s + self.per_photo_s * len(pixels))
        return np.ones((len(pixels), 4), np.float32)


def test_auto_scores_photos_alone_too_so_a_batch_only_mode_does_not_win():
    batch = np.zeros((8, 3, 4, 4), np.float32)
    batch_only = _Timed(per_call_ms=40, per_photo_ms=1)  # 6 ms/photo in 8s, 41 alone
    steady = _Timed(per_call_ms=0, per_photo_ms=8)  # 8 ms/photo either way
    batched = time_forward([batch_only, steady], batch)
    assert batched[0] < batched[1]  # timed on batches alone, the batch-only mode wins
    cost = service_cost([batch_only, steady], batch)
    assert cost[1] < cost[0]
