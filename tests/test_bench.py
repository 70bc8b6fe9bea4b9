"""`biolit-id bench --quick` runs every section end to end and writes its JSON.

A smoke run on the tiny model: it proves the benchmark works (real server,
real gRPC, real FAISS and gallery store), not how fast anything is. Speed is
never asserted here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from biolit_id.cli.main import main as cli_main


def cpu_flags() -> set[str]:
    """The ``flags`` of /proc/cpuinfo's first processor (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return set(value.split())
    return set()


def test_quick_bench_writes_every_section(demo_model_spec, tmp_path, capsys):
    out = tmp_path / "bench.json"
    started = time.perf_counter()
    rc = cli_main(["bench", "--model", demo_model_spec, "--quick", "--out", str(out),
                   "--data-dir", str(tmp_path / "bench-data")])
    wall_s = time.perf_counter() - started
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert results["decode"]["fast_ms_per_photo"] > 0
    assert 0.99 < results["decode"]["cosine_fast_vs_full_mean"] <= 1.0 + 1e-6
    assert results["seed"]["photos_per_s"] > 0
    forward = {(r["runtime"], r["precision"]): r for r in results["forward"]}
    assert forward[("torch", "fp32")]["cosine_min"] > 0.99999
    assert forward[("onnx", "fp32")]["gate_passed"] is True
    service = results["service"][0]
    assert set(service["concurrency"]) == {"1", "2"}
    for stats in service["concurrency"].values():
        assert stats["photos_per_s"] > 0 and stats["errors"] == 0
        assert stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
        assert stats["server_stage_ms_p50"]["embed_ms"] > 0
        assert stats["batcher"]["mean_batch_size"] >= 1
    assert service["idle"]["bare_forward_ms"] > 0
    assert results["adds"]["stream_adds"] == 10
    assert results["adds"]["visible_to_next_query"] is True
    gallery = results["gallery"][0]
    exact = gallery["candidates"][0]
    assert exact["index"] == "flat (exact)" and exact["recall@10"] == 1.0
    assert results["start"]["gallery_size"] >= 500
    assert results["start"]["restart_s"] > 0
    for backend in ("faiss", "milvus-lite"):
        scale = results["gallery_backends"][backend]
        assert [a["photos_before"] for a in scale["adds"]] == [0, 300]
        assert all(a["adds_per_s"] > 0 for a in scale["adds"])
        assert scale["photos"] == 350 and scale["repairs"] == 0
        assert scale["recall@10"] == 1.0  # both search exactly at this size
        assert scale["memory"]["rss_bytes"] > 0
    assert isinstance(results["targets"], list) and results["targets"]
    names = [t["target"] for t in results["targets"]]
    assert any(n.startswith("service c=4 / measured ceiling") for n in names)
    assert any(n.startswith("idle p50 / (decode + bare forward)") for n in names)
    # Each checkpoint's settle is timed inside its backend's run, itself inside this call.
    for backend in ("faiss", "milvus-lite"):
        scale = results["gallery_backends"][backend]
        settles = [a["settle_s"] for a in scale["adds"]]
        assert all(s > 0 for s in settles), settles
        assert sum(settles) < scale["seconds"] < wall_s, (settles, scale["seconds"], wall_s)
    # "amx" is what this CPU says: AMX int8 tiles in /proc/cpuinfo's flags.
    assert results["machine"]["amx"] is ("amx_int8" in cpu_flags())
    printed = capsys.readouterr().out
    assert "Service over gRPC" in printed and "Targets" in printed
    assert "Gallery backends" in printed
