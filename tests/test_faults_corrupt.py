"""Corrupt or truncated files at start, damaged for real on disk.

Derived files (the FAISS snapshot, the text-prototype cache) are detected,
rebuilt from the source of truth with a log line, and the answers stay the
same; a damaged source of truth (bundle, SQLite store) stops the start with
an error that names the file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from synthetic_bundle import write_bundle

from biolit_id.index.store import StoreError
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.app import start_server
from biolit_id.server.config import ServerConfig
from biolit_id.server.decision.bundle import BundleError
from conftest import photo_bytes, stub_for

SPECIES = "Carcinus maenas"


def config(demo_model_spec: str, data_dir: Path, **extra) -> ServerConfig:
    return ServerConfig(model=demo_model_spec, data_dir=data_dir, port=0, grace_seconds=0.5,
                        **extra)


def truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def flip_bytes(path: Path, at: float = 0.6, n: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    start = int(len(raw) * at)
    for i in range(start, min(len(raw), start + n)):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def answers(stub, dim: int) -> tuple:
    """What the service says for a fixed query: decision and similar photos."""
    query = np.cos(np.arange(dim)).tolist()
    identified = stub.Identify(pb.IdentifyRequest(embedding=query, top_k=3, num_similar=3))
    similar = stub.SearchSimilar(pb.SearchSimilarRequest(embedding=query, k=3))
    return (identified.decision.species,
            [(c.species, round(c.score, 5)) for c in identified.prototype_candidates],
            [(h.exemplar_id, round(h.score, 5)) for h in similar.results])


def seeded(demo_model_spec: str, data_dir: Path, **extra) -> tuple:
    """A gallery with a few photos, stopped cleanly; returns its answers."""
    running = start_server(config(demo_model_spec, data_dir, **extra))
    try:
        stub = stub_for(running)
        stub.AddExemplars(iter([pb.AddExemplarRequest(species=SPECIES, image=photo_bytes(s))
                                for s in range(4)]))
        return answers(stub, running.state.model.embedding_dim)
    finally:
        running.stop(0.5)


def restarted_answers(demo_model_spec: str, data_dir: Path, **extra) -> tuple:
    running = start_server(config(demo_model_spec, data_dir, **extra))
    try:
        return answers(stub_for(running), running.state.model.embedding_dim), running.state
    finally:
        running.stop(0.5)


@pytest.mark.parametrize("damage", [truncate, flip_bytes])
def test_corrupt_snapshot_is_rebuilt_from_the_store(demo_model_spec, tmp_path, caplog, damage):
    data = tmp_path / "data"
    before = seeded(demo_model_spec, data)
    snapshot = data / "gallery" / "index.snapshot"
    assert snapshot.is_file()
    damage(snapshot)
    caplog.set_level(logging.INFO)
    after, state = restarted_answers(demo_model_spec, data)
    assert after == before
    assert state.gallery.recovery == "rebuild"
    assert any("snapshot unusable" in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("damage", [truncate, flip_bytes])
def test_corrupt_text_prototype_cache_is_recomputed(demo_model_spec, tmp_path, caplog, damage):
    data = tmp_path / "data"
    before = seeded(demo_model_spec, data)
    (cache,) = (data / "text-prototypes").glob("*.npz")
    damage(cache)
    caplog.set_level(logging.WARNING)
    after, _ = restarted_answers(demo_model_spec, data)
    assert after == before
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(cache) in m and "corrupt" in m and "recomputing" in m for m in messages)
    # Rewritten whole: the next start reads it without a warning.
    caplog.clear()
    again, _ = restarted_answers(demo_model_spec, data)
    assert again == before
    assert not any("text prototype cache" in r.getMessage() for r in caplog.records)


def test_corrupt_store_stops_the_start_naming_the_file(demo_model_spec, tmp_path):
    data = tmp_path / "data"
    seeded(demo_model_spec, data)
    store = data / "gallery" / "gallery.sqlite3"
    for leftover in (store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
        leftover.unlink(missing_ok=True)  # a clean stop checkpointed them into the file
    flip_bytes(store, at=0.3, n=4096)
    with pytest.raises(StoreError, match="corrupt") as info:
        start_server(config(demo_model_spec, data))
    assert str(store) in str(info.value)
    assert "restore" in str(info.value)


def test_not_a_database_stops_the_start_naming_the_file(demo_model_spec, tmp_path):
    data = tmp_path / "data"
    store = data / "gallery" / "gallery.sqlite3"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StoreError, match="corrupt") as info:
        start_server(config(demo_model_spec, data))
    assert str(store) in str(info.value)


@pytest.mark.parametrize("damage", [truncate, flip_bytes])
def test_corrupt_bundle_stops_the_start_naming_the_file(demo_model_spec, loaded_demo_model,
                                                       tmp_path, damage):
    rng = np.random.default_rng(0)
    bundle = write_bundle(tmp_path / "bundle", loaded_demo_model, [SPECIES, "Patella vulgata"],
                          rng.normal(size=(2, loaded_demo_model.embedding_dim)))
    weights = next(p for p in bundle.iterdir() if p.suffix == ".safetensors")
    damage(weights)
    with pytest.raises(BundleError) as info:
        start_server(config(demo_model_spec, tmp_path / "data", bundle=bundle))
    assert str(weights) in str(info.value)


def test_corrupt_runtime_export_is_rebuilt(loaded_demo_model, tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    from biolit_id.server.inference.embedders.factory import make_embedder

    size = loaded_demo_model.image_size
    pixels = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
    want = make_embedder(loaded_demo_model, "onnx", "fp32", cache_dir=tmp_path).embed(pixels)
    (exported,) = (tmp_path / "runtimes").rglob("model.onnx")
    flip_bytes(exported)  # flipped weights would load fine and answer wrongly
    caplog.set_level(logging.WARNING)
    again = make_embedder(loaded_demo_model, "onnx", "fp32", cache_dir=tmp_path)
    np.testing.assert_allclose(again.embed(pixels), want, atol=1e-5)
    assert any("runtime export" in r.getMessage() and "corrupt" in r.getMessage()
               and "rebuilding" in r.getMessage() for r in caplog.records)
