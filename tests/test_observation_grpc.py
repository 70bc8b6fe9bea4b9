"""IdentifyObservation, and Identify with a place and date, over real gRPC on loopback
(and POST /v1/identify-observation over real HTTP).

The bundle, the occurrence records and the photos are SYNTHETIC
(tools/training/synthetic_observations.py): catalog names with invented looks and ranges,
embeddings sent as embedding input.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
import requests

from biolit_id.cli.training.prior_fit import clean_records, fit_prior
from biolit_id.cli.training.synthetic_observations import (
    fit_temperature,
    make_world,
    occurrences,
    photo_embeddings,
    world_bundle,
)
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.decision.observations import CombinerParams
from biolit_id.server.grpc.auth import ROLE_IDENTIFY, required_role
from conftest import code_of, photo_bytes, stub_for

ROSCOFF = pb.Location(latitude=48.73, longitude=-3.98, uncertainty_m=500)
MARSEILLE = pb.Location(latitude=43.30, longitude=5.37)
NORTH, SOUTH = "Actinia equina", "Actinia mediterranea"


@pytest.fixture(scope="module")
def world():
    return make_world(512, seed=0)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, world, loaded_demo_model) -> Path:
    model = loaded_demo_model
    bundle = world_bundle(world, fit_temperature(world, 7), model.spec, model.fingerprint)
    directory = bundle.save(tmp_path_factory.mktemp("obs") / "bundle")
    names, lat, lon, day, _ = clean_records(pd.DataFrame(occurrences(world, 200)), world.names)
    fit_prior(names, lat, lon, day).save(directory / "prior")
    CombinerParams(rho=0.1, outlier=0.05, prior_weight=1.0, prior_floor=0.05).save(
        directory / "prior")
    return directory


@pytest.fixture
def obs_stub(make_server, bundle_dir):
    return stub_for(make_server(bundle=bundle_dir))


def photos_of(world, name: str, count: int, seed: int, spread: float = 4.0) -> list:
    rng = np.random.default_rng(seed)
    w = make_world(512, 0, spread=spread)  # same prototypes, chosen noise
    rows = photo_embeddings(w, world.names.index(name), count, rng)
    return [pb.ObservationPhoto(embedding=row.tolist()) for row in rows]


def between(world, a: str, b: str) -> list[float]:
    mid = world.prototypes[world.names.index(a)] + world.prototypes[world.names.index(b)]
    return (mid / np.linalg.norm(mid)).tolist()


def test_several_photos_beat_one(obs_stub, world) -> None:
    photos = photos_of(world, "Fucus serratus", 3, seed=1, spread=8.0)
    one = obs_stub.IdentifyObservation(pb.IdentifyObservationRequest(photos=photos[:1]))
    three = obs_stub.IdentifyObservation(pb.IdentifyObservationRequest(
        photos=photos, top_k=3, request_id="obs-1"))
    assert three.request_id == "obs-1"
    # Embeddings only: nothing was decoded or embedded.
    assert three.timing.decode_ms == 0 == three.timing.embed_ms and three.timing.total_ms > 0
    assert three.decision.method == pb.METHOD_OBSERVATION
    assert three.decision.species == "Fucus serratus"
    assert three.decision.rank == pb.RANK_SPECIES
    assert three.decision.confidence > one.decision.confidence
    assert three.decision.confidence == pytest.approx(three.candidates[0].score)
    assert [t.name for t in three.taxonomy.lineage][-1] == "Fucus serratus"
    assert len(three.photos) == 3 and len(three.candidates) == 3
    own = [p.prototype_candidates[0].score for p in three.photos]
    assert three.decision.confidence > max(own)
    ev = three.evidence
    assert ev.combiner == "product" and ev.effective_photos == pytest.approx(3 / 1.2)
    assert [p.index for p in ev.photos] == [0, 1, 2]
    assert all(p.answer_probability > 0 for p in ev.photos)
    assert not ev.prior.applied and "location" in ev.prior.reason
    info = obs_stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert three.versions.prior_version == info.versions.prior_version != ""
    assert info.limits.max_observation_photos == 8


def test_an_off_target_photo_does_not_flip_the_answer(obs_stub, world) -> None:
    photos = photos_of(world, "Carcinus maenas", 2, seed=2) + photos_of(
        world, "Asterias rubens", 1, seed=3)
    resp = obs_stub.IdentifyObservation(pb.IdentifyObservationRequest(photos=photos))
    assert resp.decision.species == "Carcinus maenas"
    stray = resp.evidence.photos[2]
    assert stray.top_species == "Asterias rubens" and not stray.agrees
    assert stray.excluded and stray.outlier_probability > 0.5
    assert resp.evidence.photos[0].agrees and not resp.evidence.photos[0].excluded
    assert resp.photos[2].prototype_candidates[0].species == "Asterias rubens"


def test_place_settles_look_alikes(obs_stub, world) -> None:
    photo = [pb.ObservationPhoto(embedding=between(world, NORTH, SOUTH))]
    north = obs_stub.IdentifyObservation(pb.IdentifyObservationRequest(
        photos=photo, location=ROSCOFF, observed_on="2023-06-01"))
    south = obs_stub.IdentifyObservation(pb.IdentifyObservationRequest(
        photos=photo, location=MARSEILLE))
    assert north.decision.species == NORTH and south.decision.species == SOUTH
    prior = south.evidence.prior
    assert prior.applied and prior.used_location and not prior.used_date
    assert prior.weight == 1.0
    shifts = {s.species: s for s in prior.shifts}
    assert shifts[SOUTH].prior_factor > 1.0 > shifts[NORTH].prior_factor
    assert shifts[SOUTH].with_prior > shifts[SOUTH].without_prior
    assert shifts[SOUTH].rank_with_prior == 1
    assert north.evidence.prior.used_date
    # Identify takes the same place and gives the same answer.
    single = obs_stub.Identify(pb.IdentifyRequest(embedding=photo[0].embedding,
                                                  location=MARSEILLE, top_k=3))
    assert single.decision.method == pb.METHOD_OBSERVATION
    assert single.decision.species == SOUTH
    assert single.decision.confidence == pytest.approx(south.decision.confidence)
    assert single.prior.applied and single.prior.answer_without_prior in {NORTH, SOUTH}
    plain = obs_stub.Identify(pb.IdentifyRequest(embedding=photo[0].embedding))
    assert not plain.HasField("prior") and plain.decision.method != pb.METHOD_OBSERVATION


def test_restriction_applies_to_the_observation(obs_stub, world) -> None:
    photos = photos_of(world, "Fucus serratus", 2, seed=4)
    resp = obs_stub.IdentifyObservation(pb.IdentifyObservationRequest(
        photos=photos, restrict_to=["Actiniidae"], top_k=5))
    actiniidae = {"Actinia equina", "Actinia mediterranea", "Anemonia viridis"}
    # Photos of Fucus, restricted to the family: the answer and every candidate are in it,
    # and the whole probability lies on its three species (top_k=5 leaves room for more).
    scores = [c.score for c in resp.candidates]
    assert {c.species for c in resp.candidates} == actiniidae
    assert all(s > 0 for s in scores) and scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-6)
    assert resp.decision.species == resp.candidates[0].species
    assert resp.decision.confidence == pytest.approx(scores[0])
    for photo in resp.photos:
        assert photo.prototype_candidates
        assert {c.species for c in photo.prototype_candidates} <= actiniidae


def test_bad_requests_are_invalid_argument(obs_stub, world) -> None:
    good = photos_of(world, "Carcinus maenas", 1, seed=5)
    cases = {
        "no photos": pb.IdentifyObservationRequest(),
        "too many": pb.IdentifyObservationRequest(photos=good * 9),
        "bad date": pb.IdentifyObservationRequest(photos=good, observed_on="2024-02-30"),
        "not iso": pb.IdentifyObservationRequest(photos=good, observed_on="01/02/2024"),
        "latitude": pb.IdentifyObservationRequest(
            photos=good, location=pb.Location(latitude=95.0, longitude=0.0)),
        "both inputs": pb.IdentifyObservationRequest(
            photos=[*good, pb.ObservationPhoto(image=b"x", embedding=[0.1] * 512)]),
        "wrong length": pb.IdentifyObservationRequest(
            photos=[pb.ObservationPhoto(embedding=[0.1] * 10)]),
    }
    for label, request in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            obs_stub.IdentifyObservation(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
    with pytest.raises(grpc.RpcError) as err:
        obs_stub.IdentifyObservation(cases["both inputs"])
    assert "photos[1]" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        obs_stub.IdentifyObservation(cases["too many"])
    assert "at most 8" in err.value.details()
    assert code_of(lambda: obs_stub.Identify(pb.IdentifyRequest(
        embedding=good[0].embedding, observed_on="2024-1-1"))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: obs_stub.IdentifyObservation(
        pb.IdentifyObservationRequest(photos=good * 8))) == grpc.StatusCode.OK


def test_photos_without_a_prior(stub) -> None:
    """Zero-shot, no prior: photos combine, the place is reported as unused."""
    photos = [pb.ObservationPhoto(image=photo_bytes(s)) for s in (11, 12)]
    resp = stub.IdentifyObservation(pb.IdentifyObservationRequest(
        photos=photos, location=MARSEILLE, top_k=3))
    # Both photos are decoded and embedded in one batch, timed once for the observation;
    # each photo's own timing is its scoring.
    assert len(resp.photos) == 2
    timing = resp.timing
    assert timing.decode_ms > 0 and timing.embed_ms > 0
    assert all(p.timing.decode_ms == 0 == p.timing.embed_ms for p in resp.photos)
    assert all(p.timing.score_ms > 0 for p in resp.photos)
    assert timing.score_ms == pytest.approx(sum(p.timing.score_ms for p in resp.photos))
    assert timing.total_ms > timing.decode_ms + timing.embed_ms + timing.score_ms
    assert not resp.evidence.prior.applied and "prior fit" in resp.evidence.prior.reason
    assert resp.versions.prior_version == ""
    assert resp.decision.method in (pb.METHOD_OBSERVATION, pb.METHOD_REJECTED)
    single = stub.Identify(pb.IdentifyRequest(image=photo_bytes(11), location=MARSEILLE))
    assert not single.prior.applied and single.prior.reason


def test_identify_role_may_call_it() -> None:
    assert required_role("/biolit.v1.SpeciesIdentifier/IdentifyObservation") == ROLE_IDENTIFY


def test_http_json_and_form_agree_with_grpc(make_server, bundle_dir, world) -> None:
    running = make_server(bundle=bundle_dir, http_port=0)
    url = running.http.url.rstrip("/") + "/v1/identify-observation"
    photo = between(world, NORTH, SOUTH)
    body = requests.post(url, timeout=60, json={
        "photos": [{"embedding": photo}, {"embedding": photo}],
        "location": {"latitude": 43.3, "longitude": 5.37}, "observedOn": "2023-06-01"}).json()
    grpc_answer = stub_for(running).IdentifyObservation(pb.IdentifyObservationRequest(
        photos=[pb.ObservationPhoto(embedding=photo)] * 2, location=MARSEILLE,
        observed_on="2023-06-01"))
    assert body["decision"]["species"] == grpc_answer.decision.species == SOUTH
    assert body["decision"]["method"] == "METHOD_OBSERVATION"
    assert body["evidence"]["prior"]["applied"] is True
    assert body["versions"]["priorVersion"] == grpc_answer.versions.prior_version
    files = [("image", (f"p{i}.jpg", photo_bytes(20 + i), "image/jpeg")) for i in range(2)]
    form = requests.post(url, files=files, timeout=60,
                         data={"latitude": "48.73", "longitude": "-3.98", "topK": "2"})
    assert form.status_code == 200, form.text
    answer = form.json()
    assert len(answer["photos"]) == 2 and len(answer["candidates"]) <= 2
    assert answer["evidence"]["prior"]["usedLocation"] is True
    bad = requests.post(url, timeout=60, json={"photos": [{"embedding": photo}],
                                                "observedOn": "June"})
    assert bad.status_code == 400 and bad.json()["code"] == "INVALID_ARGUMENT"


def test_pooled_combiner_from_the_data_dir(make_server, tmp_path: Path, world) -> None:
    """A combiner.json in DATA_DIR/prior/ (no bundle, no prior): read at start, versioned."""
    CombinerParams(method="pooled", pooled_gamma=0.5).save(tmp_path / "data" / "prior")
    stub = stub_for(make_server())
    photos = [pb.ObservationPhoto(image=photo_bytes(s)) for s in (31, 32)]
    resp = stub.IdentifyObservation(pb.IdentifyObservationRequest(photos=photos, top_k=3))
    assert resp.evidence.combiner == "pooled"
    assert resp.versions.prior_version != "" and not resp.evidence.prior.applied
    assert sum(c.score for c in resp.candidates) <= 1.0 + 1e-9
    one = stub.IdentifyObservation(pb.IdentifyObservationRequest(photos=photos[:1]))
    assert one.evidence.combiner == "single photo"
    assert one.decision.confidence == pytest.approx(
        max(c.score for c in one.photos[0].prototype_candidates), abs=1e-6)
