"""Exported runtimes on the tiny demo model: same embeddings, cached, explicit precision.

All exports share one module-scoped cache folder, so the model is exported
once (a few seconds) for the whole file, as a server would do once per model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from biolit_id.cli.main import main as cli_main
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.inference.embedders.auto import build_embedder, resolve_auto
from biolit_id.server.inference.embedders.base import RuntimeUnavailableError
from biolit_id.server.inference.embedders.calibration import (
    calibration_pixels,
    calibration_tag,
    synthetic_photos,
)
from biolit_id.server.inference.embedders.export import (
    artifact_root,
    onnx_int8_weight_type,
    quantize_onnx_int8,
)
from biolit_id.server.inference.embedders.factory import make_embedder
from biolit_id.server.inference.embedders.gate import fidelity
from biolit_id.server.inference.embedders.hardware import (
    cpu_has_amx_int8,
    cpu_has_bf16,
    cpu_has_vnni,
)
from biolit_id.server.inference.embedders.onnx import OnnxEmbedder
from biolit_id.server.inference.embedders.threads import configure_threads
from conftest import photo_folder, stub_for

pytest.importorskip("onnxruntime", reason="install biolit-id[onnx] for the ONNX runtime")
pytest.importorskip("openvino", reason="install biolit-id[openvino] for OpenVINO")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runtime-cache")


@pytest.fixture(scope="module")
def pixels(loaded_demo_model) -> np.ndarray:
    return calibration_pixels(loaded_demo_model, count=6)


@pytest.fixture(scope="module")
def reference(loaded_demo_model, pixels) -> np.ndarray:
    return make_embedder(loaded_demo_model, "torch", "fp32").embed(pixels)


def test_onnx_export_matches_torch_for_any_batch_size(loaded_demo_model, cache_dir, pixels,
                                                      reference):
    embedder = build_embedder(loaded_demo_model, "onnx", "fp32", cache_dir)
    assert (embedder.runtime, embedder.precision) == ("onnx", "fp32")
    np.testing.assert_allclose(embedder.embed(pixels[:1]), reference[:1], atol=1e-4)
    np.testing.assert_allclose(embedder.embed(pixels[1:4]), reference[1:4], atol=1e-4)
    folder = artifact_root(loaded_demo_model, cache_dir) / "onnx-fp32"
    assert embedder.path == folder / "model.onnx"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["fingerprint"] == loaded_demo_model.fingerprint
    assert meta["opset"] == 18


def test_export_happens_once_per_model(loaded_demo_model, cache_dir):
    path = build_embedder(loaded_demo_model, "onnx", "fp32", cache_dir).path
    stamp = path.stat().st_mtime_ns
    again = build_embedder(loaded_demo_model, "onnx", "fp32", cache_dir).path
    assert again == path and again.stat().st_mtime_ns == stamp
    assert not list(path.parent.parent.glob("*.tmp-*"))  # no half-built leftovers


def test_onnx_int8_is_smaller_and_passes_the_gate_here(loaded_demo_model, cache_dir, pixels,
                                                      reference):
    embedder = build_embedder(loaded_demo_model, "onnx", "int8", cache_dir)
    fp32 = artifact_root(loaded_demo_model, cache_dir) / "onnx-fp32" / "model.onnx"
    assert embedder.path.stat().st_size < 0.6 * fp32.stat().st_size
    out = embedder.embed(pixels)
    assert not np.allclose(out, reference, atol=1e-6)  # really quantised
    assert fidelity(reference, out, "onnx", "int8").passed


def test_onnx_int8_weight_type_follows_the_cpu_and_u8_passes_everywhere(
        loaded_demo_model, cache_dir, pixels, reference):
    # u8 x s8 saturates without VNNI; the default must avoid it on this CPU.
    assert onnx_int8_weight_type() == ("s8" if cpu_has_vnni() else "u8")
    default = build_embedder(loaded_demo_model, "onnx", "int8", cache_dir).path
    assert default.parent.name == f"onnx-int8-{onnx_int8_weight_type()}"
    assert json.loads((default.parent / "meta.json").read_text())["weight_type"] == (
        onnx_int8_weight_type())
    # u8 weights never saturate, whatever the CPU: they pass the gate on any machine.
    u8 = quantize_onnx_int8(loaded_demo_model, cache_dir, weight_type="u8")
    embedder = OnnxEmbedder(u8, "int8", loaded_demo_model.embedding_dim)
    assert fidelity(reference, embedder.embed(pixels), "onnx", "int8").passed
    with pytest.raises(ValueError, match="s8 or u8"):
        quantize_onnx_int8(loaded_demo_model, cache_dir, weight_type="s4")


def test_openvino_runs_the_precision_that_was_asked(loaded_demo_model, cache_dir, pixels,
                                                    reference):
    fp32 = build_embedder(loaded_demo_model, "openvino", "fp32", cache_dir)
    assert fp32.compiled_precision == "f32"
    np.testing.assert_allclose(fp32.embed(pixels), reference, atol=1e-4)
    if not cpu_has_bf16():
        with pytest.raises(RuntimeUnavailableError, match="bf16"):
            build_embedder(loaded_demo_model, "openvino", "bf16", cache_dir)
        return
    bf16 = build_embedder(loaded_demo_model, "openvino", "bf16", cache_dir)
    assert bf16.compiled_precision == "bf16"
    out = bf16.embed(pixels)
    assert np.abs(out - reference).max() > 1e-4  # bf16 arithmetic, not silently f32
    assert fidelity(reference, out, "openvino", "bf16").passed


def test_openvino_int8_is_quantised_by_nncf(loaded_demo_model, cache_dir, pixels, reference):
    pytest.importorskip("nncf", reason="OpenVINO int8 needs NNCF")
    import openvino as ov

    embedder = build_embedder(loaded_demo_model, "openvino", "int8", cache_dir)
    assert calibration_tag(None) in embedder.path.parent.name
    ops = {op.get_type_name() for op in ov.Core().read_model(str(embedder.path)).get_ops()}
    assert "FakeQuantize" in ops
    assert fidelity(reference, embedder.embed(pixels), "openvino", "int8").cosine_min > 0.99


def test_unsupported_choices_say_what_to_do_instead(loaded_demo_model, cache_dir):
    with pytest.raises(RuntimeUnavailableError, match="onnx --precision int8"):
        build_embedder(loaded_demo_model, "torch", "int8", cache_dir)
    with pytest.raises(RuntimeUnavailableError, match="openvino"):
        build_embedder(loaded_demo_model, "onnx", "bf16", cache_dir)
    with pytest.raises(RuntimeUnavailableError, match="unknown runtime"):
        build_embedder(loaded_demo_model, "tensorrt", "fp32", cache_dir)


def test_fidelity_gate_separates_good_and_bad_embeddings(reference):
    assert fidelity(reference, reference, "x", "fp32").passed
    noisy = reference + np.random.default_rng(0).normal(0, 0.05, reference.shape)
    gate = fidelity(reference, noisy, "x", "int8")
    assert not gate.passed and gate.cosine_min < 0.999


def test_auto_picks_the_fastest_runtime_that_passes_and_remembers_it(
        loaded_demo_model, cache_dir):
    embedder, choice = resolve_auto(loaded_demo_model, "auto", "auto", cache_dir)
    assert not choice.reused
    assert all(g.passed for g in choice.gates)  # the tiny model passes everywhere
    timed = choice.ms_per_photo
    assert "torch fp32" in timed and "onnx fp32" in timed and "openvino fp32" in timed
    assert ("openvino bf16" in timed) == cpu_has_bf16()
    chosen = f"{embedder.runtime} {embedder.precision}"
    assert timed[chosen] == min(timed.values())
    gated_int8 = any(g.precision == "int8" for g in choice.gates)
    assert gated_int8 == cpu_has_amx_int8()  # int8 only when asked for, or on AMX
    # The second start reuses the recorded choice instead of measuring again.
    again, second = resolve_auto(loaded_demo_model, "auto", "auto", cache_dir)
    assert second.reused and (again.runtime, again.precision) == (embedder.runtime,
                                                                  embedder.precision)
    # A pinned runtime only frees the other field.
    pinned, _ = resolve_auto(loaded_demo_model, "onnx", "auto", cache_dir)
    assert (pinned.runtime, pinned.precision) == ("onnx", "fp32")


def test_auto_falls_back_to_the_reference_when_nothing_passes(loaded_demo_model, cache_dir):
    embedder, choice = resolve_auto(loaded_demo_model, "auto", "auto", cache_dir,
                                    candidates=[("onnx", "int8"), ("openvino", "fp32")],
                                    threshold=1.01)
    assert (embedder.runtime, embedder.precision) == ("torch", "fp32")
    assert choice.gates and not any(g.passed for g in choice.gates)
    # int8 only when asked for, and then through the gate too.
    embedder, choice = resolve_auto(loaded_demo_model, "auto", "int8", cache_dir)
    assert embedder.precision == "int8" and choice.gates[0].passed


def test_thread_counts_are_applied():
    import faiss
    import torch

    before = torch.get_num_threads()
    try:
        assert configure_threads(1, 1) == {"model_threads": 1, "search_threads": 1}
        assert torch.get_num_threads() == 1
        assert faiss.omp_get_max_threads() == 1
    finally:
        configure_threads(before, 1)


def test_check_runtime_reports_cosine_and_agreement(demo_model_spec, cache_dir, tmp_path,
                                                   capsys):
    photos = photo_folder(tmp_path / "photos", 4, seed=3)
    report = tmp_path / "report.json"
    args = ["check-runtime", "--model", demo_model_spec, "--images", str(photos),
            "--runtime", "onnx", "--precision", "fp32", "--data-dir", str(cache_dir)]
    assert cli_main([*args, "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement" in out and "PASS" in out
    data = json.loads(report.read_text())
    assert data["photos"] == 4 and data["cosine_min"] > 0.9999
    assert data["top1_decision_agreement"] == 1.0
    assert cli_main([*args, "--threshold", "1.01"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_service_runs_an_exported_runtime_end_to_end(make_server, cache_dir):
    running = make_server(runtime="onnx", precision="fp32", data_dir=cache_dir)
    stub = stub_for(running)
    info = stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert (info.runtime, info.precision) == ("onnx", "fp32")
    reference = make_server()  # torch fp32
    photo = synthetic_photos(1, (640, 480), seed=9)[0]
    got = stub.Identify(pb.IdentifyRequest(image=photo))
    want = stub_for(reference).Identify(pb.IdentifyRequest(image=photo))
    assert [c.species for c in got.prototype_candidates] == [
        c.species for c in want.prototype_candidates]
    assert [c.score for c in got.prototype_candidates] == pytest.approx(
        [c.score for c in want.prototype_candidates], abs=1e-4)
