"""Identify over real gRPC on loopback, zero-shot over the catalog (both seed generations)."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.grpc.messages import RANK_TO_PB
from conftest import photo_bytes

CATALOG = set(Catalog.load_default().names())


def channel_of(running) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{running.port}")


def assert_valid_decision(resp: pb.IdentifyResponse) -> None:
    d = resp.decision
    assert 0.0 <= d.confidence <= 1.0
    if d.method == pb.METHOD_REJECTED:
        assert d.species == ""
    else:
        assert d.method == pb.METHOD_ZERO_SHOT
        assert d.species in CATALOG
        assert [t.name for t in resp.taxonomy.lineage][-1] == d.species
    assert len(resp.prototype_candidates) == 3
    assert all(c.species in CATALOG for c in resp.prototype_candidates)
    scores = [c.score for c in resp.prototype_candidates]
    assert scores == sorted(scores, reverse=True)


def test_health_is_serving(zero_shot_server) -> None:
    health = health_pb2_grpc.HealthStub(channel_of(zero_shot_server))
    for service in ("", "biolit.v1.SpeciesIdentifier"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(zero_shot_server) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel_of(zero_shot_server))
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in response.list_services_response.service}
    assert "biolit.v1.SpeciesIdentifier" in names
    assert "grpc.health.v1.Health" in names


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_identify_each_format(stub, fmt: str) -> None:
    resp = stub.Identify(pb.IdentifyRequest(image=photo_bytes(1, fmt), top_k=3, request_id="r1"))
    assert_valid_decision(resp)
    assert resp.request_id == "r1"
    assert resp.versions.catalog_version
    assert len(resp.versions.model_fingerprint) == 16
    assert resp.timing.embed_ms > 0 and resp.timing.decode_ms > 0
    assert 0 < resp.timing.queue_ms < resp.timing.total_ms  # the wait for a model batch


def test_zero_shot_accepts_a_confident_match(stub, loaded_demo_model) -> None:
    # The demo model's text prototype itself, sent as an embedding, is a sure match.
    record = Catalog.load_default().get("Carcinus maenas")
    vec = loaded_demo_model.encode_text([record.prompt()])[0]
    resp = stub.Identify(pb.IdentifyRequest(embedding=vec.tolist()))
    assert resp.decision.method == pb.METHOD_ZERO_SHOT
    assert resp.decision.species == "Carcinus maenas"
    assert resp.decision.rank == pb.RANK_SPECIES
    lineage = {t.rank: t.name for t in resp.taxonomy.lineage}
    assert lineage[pb.RANK_FAMILY] == "Carcinidae"
    assert {v.language for v in resp.taxonomy.vernacular_names} >= {"fr", "en"}


def test_list_species_has_every_species_with_complete_taxonomy(stub) -> None:
    species = stub.ListSpecies(pb.ListSpeciesRequest()).species
    assert len(species) == len(CATALOG) == 235  # both seed generations (100 + 215, 80 shared)
    all_ranks = [pb.RANK_KINGDOM, pb.RANK_PHYLUM, pb.RANK_CLASS, pb.RANK_ORDER,
                 pb.RANK_FAMILY, pb.RANK_GENUS, pb.RANK_SPECIES]
    catalog = Catalog.load_default()
    for s in species:
        ranks = [t.rank for t in s.taxonomy.lineage]
        # a rank may be absent only where the catalog records why it was not filled
        unfilled = {RANK_TO_PB[r] for r, why in catalog.get(s.scientific_name)
                    .taxonomy_source.items() if why.startswith("not filled")}
        assert ranks == [r for r in all_ranks if r not in unfilled], s.scientific_name
        assert all(t.name for t in s.taxonomy.lineage)
        assert s.has_text_prototype and s.has_prototype
        assert not s.in_classifier  # no trained head in zero-shot mode
        assert not s.has_visual_prototype  # no bundle, no reference photos yet
    crabs = stub.ListSpecies(pb.ListSpeciesRequest(taxon="Decapoda")).species
    assert "Carcinus maenas" in {s.scientific_name for s in crabs}
    assert len(crabs) < len(species)


def test_get_species_and_service_info(stub) -> None:
    s = stub.GetSpecies(pb.GetSpeciesRequest(scientific_name="Patella sp."))
    assert s.rank == pb.RANK_GENUS
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSpecies(pb.GetSpeciesRequest(scientific_name="Nessiteras rhombopteryx"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    info = stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert info.embedding_dim == 512
    assert info.catalog_size == len(CATALOG)
    assert info.mode == "zero-shot"
    assert info.preprocessing.image_size == 224
    assert info.preprocessing.resize_mode == "resize"
    assert list(info.preprocessing.mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_stream_answers_50_in_order_equal_to_unary(stub) -> None:
    photos = [photo_bytes(100 + i, "JPEG" if i % 2 else "PNG") for i in range(50)]
    requests = [pb.IdentifyRequest(image=p, request_id=str(i)) for i, p in enumerate(photos)]
    streamed = list(stub.IdentifyStream(iter(requests)))
    assert [r.request_id for r in streamed] == [str(i) for i in range(50)]
    for request, got in zip(requests, streamed, strict=True):
        unary = stub.Identify(request)
        assert got.decision.method == unary.decision.method
        assert got.decision.species == unary.decision.species
        assert got.decision.confidence == pytest.approx(unary.decision.confidence, abs=1e-6)
        assert [c.species for c in got.prototype_candidates] == [
            c.species for c in unary.prototype_candidates
        ]


def test_image_and_embedding_inputs_agree(stub, zero_shot_server) -> None:
    photo = photo_bytes(7)
    ident = zero_shot_server.state.identifier
    vec = ident.embed_fn(ident.decode(photo)[None])[0]
    by_image = stub.Identify(pb.IdentifyRequest(image=photo))
    by_embedding = stub.Identify(pb.IdentifyRequest(embedding=vec.tolist()))
    assert by_image.decision.method == by_embedding.decision.method
    assert by_image.decision.species == by_embedding.decision.species
    assert by_image.decision.confidence == pytest.approx(by_embedding.decision.confidence, abs=1e-5)
    assert [c.species for c in by_image.prototype_candidates] == [
        c.species for c in by_embedding.prototype_candidates
    ]


def _truncated_jpeg() -> bytes:
    data = photo_bytes(3, "JPEG", size=(640, 480))
    return data[: len(data) // 3]


BAD_REQUESTS = {
    "empty request": (pb.IdentifyRequest(), "neither image nor embedding"),
    "both inputs": (pb.IdentifyRequest(image=photo_bytes(1), embedding=[0.1] * 512), "not both"),
    "not an image": (pb.IdentifyRequest(image=b"%PDF-1.4 definitely not a photo"), "not a"),
    "truncated image": (pb.IdentifyRequest(image=_truncated_jpeg()), "truncated"),
    "wrong length": (pb.IdentifyRequest(embedding=[0.1] * 100), "embedding_dim is 512"),
    "nan": (pb.IdentifyRequest(embedding=[float("nan")] + [0.1] * 511), "NaN"),
    "infinity": (pb.IdentifyRequest(embedding=[float("inf")] + [0.1] * 511), "infinity"),
    "zero vector": (pb.IdentifyRequest(embedding=[0.0] * 512), "all zeros"),
    "negative top_k": (pb.IdentifyRequest(embedding=[0.1] * 512, top_k=-1), "top_k"),
    "huge top_k": (pb.IdentifyRequest(embedding=[0.1] * 512, top_k=10**6), "top_k"),
    "negative num_similar": (pb.IdentifyRequest(embedding=[0.1] * 512, num_similar=-3),
                             "num_similar"),
    "unknown taxon": (pb.IdentifyRequest(embedding=[0.1] * 512, restrict_to=["Dragonidae"]),
                      "Dragonidae"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_and_service_stays_healthy(stub, zero_shot_server,
                                                                 case: str) -> None:
    request, fragment = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.Identify(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment.lower() in err.value.details().lower()
    health = health_pb2_grpc.HealthStub(channel_of(zero_shot_server))
    assert health.Check(health_pb2.HealthCheckRequest()).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    assert_valid_decision(stub.Identify(pb.IdentifyRequest(image=photo_bytes(2), top_k=3)))


def test_zero_byte_image_is_an_empty_request(stub) -> None:
    # proto3 cannot tell b"" from unset: both say "no input".
    with pytest.raises(grpc.RpcError) as err:
        stub.Identify(pb.IdentifyRequest(image=b""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_top_k_is_clamped_to_the_species_count(stub) -> None:
    resp = stub.Identify(pb.IdentifyRequest(embedding=[0.1] * 512, top_k=500))
    assert len(resp.prototype_candidates) == len(CATALOG)


def test_stream_reports_bad_items_and_goes_on(stub) -> None:
    requests = [
        pb.IdentifyRequest(image=photo_bytes(1), request_id="ok-1"),
        pb.IdentifyRequest(image=b"garbage", request_id="bad"),
        pb.IdentifyRequest(image=photo_bytes(2), request_id="ok-2"),
    ]
    out = list(stub.IdentifyStream(iter(requests)))
    assert [r.request_id for r in out] == ["ok-1", "bad", "ok-2"]
    assert out[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert out[0].decision.method != pb.METHOD_UNSPECIFIED and not out[0].error.message
    assert out[2].decision.method != pb.METHOD_UNSPECIFIED


def test_exif_orientation_is_applied(zero_shot_server) -> None:
    ident = zero_shot_server.state.identifier
    img = Image.open(io.BytesIO(photo_bytes(5, "JPEG", size=(400, 200))))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    tagged = io.BytesIO()
    img.save(tagged, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = io.BytesIO()
    img.transpose(Image.Transpose.ROTATE_270).save(upright, format="JPEG", quality=95)
    a, b = ident.decode(tagged.getvalue()), ident.decode(upright.getvalue())
    assert np.abs(a - b).mean() < 0.1
    assert np.abs(a - ident.decode(photo_bytes(5, "JPEG", size=(400, 200)))).mean() > 0.1
