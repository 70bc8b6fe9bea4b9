"""Nothing assumes 512: a 768-d model end to end, and 512-d things refused, not mixed.

A tiny demo model 768 wide stands in for BioCLIP-2 (same code paths, seconds
instead of minutes): zero-shot text prototypes, the gallery's index and store
(FAISS and Milvus Lite), GetServiceInfo, and what happens when a 512-d
embedding, or a gallery made by another model, comes along.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from biolit_id.cli.demo_model import write_demo_model
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.app import start_server
from biolit_id.server.config import ServerConfig
from conftest import stub_for

SPECIES = "Patella vulgata"


@pytest.fixture(scope="module")
def wide_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"local-dir:{write_demo_model(tmp_path_factory.mktemp('wide'), embed_dim=768)}"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x)).astype(np.float32)


def code_and_details(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("gallery", ["faiss", "milvus-lite"])
def test_a_768_d_service_end_to_end(gallery: str, wide_spec: str, demo_model_spec: str,
                                    tmp_path: Path) -> None:
    data = tmp_path / "data"
    backend = "faiss" if gallery == "faiss" else f"milvus-lite:{tmp_path / 'gallery.db'}"
    config = ServerConfig(model=wide_spec, data_dir=data, port=0, grace_seconds=0.5,
                          gallery=backend)
    running = start_server(config)
    try:
        stub = stub_for(running)
        info = stub.GetServiceInfo(pb.GetServiceInfoRequest())
        assert info.embedding_dim == 768 and info.mode == "zero-shot"
        rng = np.random.default_rng(0)
        photo = unit(rng.normal(size=768))
        resp = stub.Identify(pb.IdentifyRequest(embedding=photo.tolist(), top_k=3))
        assert len(resp.prototype_candidates) == 3  # text prototypes are 768-d too

        added = stub.AddExemplars(iter([pb.AddExemplarRequest(
            species=SPECIES, embedding=photo.tolist(), source_uri="test://768")]))
        assert len(added.exemplar_ids) == 1
        hits = stub.SearchSimilar(pb.SearchSimilarRequest(embedding=photo.tolist(), k=1))
        assert hits.results[0].exemplar_id == added.exemplar_ids[0]
        assert hits.results[0].score == pytest.approx(1.0, abs=1e-4)

        narrow = unit(rng.normal(size=512)).tolist()
        for call in (lambda: stub.Identify(pb.IdentifyRequest(embedding=narrow)),
                     lambda: stub.AddExemplars(iter([pb.AddExemplarRequest(
                         species=SPECIES, embedding=narrow)])),
                     lambda: stub.SearchSimilar(pb.SearchSimilarRequest(embedding=narrow))):
            code, details = code_and_details(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "768" in details, details
        assert stub.ListExemplars(pb.ListExemplarsRequest(species=SPECIES)).exemplars
    finally:
        running.stop(0.5)

    if gallery != "faiss":  # Milvus Lite keeps its file until the process ends
        return
    # the same gallery under a 512-d model: refused at start, naming both, nothing mixed
    with pytest.raises(Exception, match=r"768-d.*512-d") as err:
        start_server(ServerConfig(model=demo_model_spec, data_dir=data, port=0,
                                  grace_seconds=0.5, gallery=backend))
    assert "another model" in str(err.value) or "fingerprint" in str(err.value)
