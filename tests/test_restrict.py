"""``restrict_to`` over real gRPC: never a species outside the allowed set.

Queries include the exact prototype of every species, so the best species
overall is very often a forbidden one; the restricted answer must still stay
inside the set, in zero-shot mode and in hybrid mode (constructed bundle with
a random head and low thresholds, so that answers do occur).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from synthetic_bundle import unit, write_bundle

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.app import RunningServer, start_server
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.config import ServerConfig
from biolit_id.server.decision.types import Thresholds
from biolit_id.server.inference.types import MAX_RESTRICT_TO
from conftest import stub_for

CATALOG = Catalog.load_default()
RESTRICTIONS = [
    ["Gastropoda"],
    ["Fucus", "Carcinus maenas"],
    ["Patella vulgata", "Littorina littorea"],
    ["Phaeophyceae", "Decapoda", "Mytilus edulis"],
]
HYBRID_SPECIES = [
    "Patella vulgata", "Carcinus maenas", "Fucus serratus", "Littorina littorea",
    "Mytilus edulis",  # the head's (common) species
    "Patella caerulea", "Fucus vesiculosus", "Littorina saxatilis", "Actinia equina",
    "Asterias rubens",
]
HYBRID_RESTRICTIONS = [
    ["Gastropoda"],
    ["Fucus"],
    ["Carcinus maenas", "Patella caerulea"],
    ["Asterias rubens"],
    ["Bivalvia", "Actinia equina"],
]


def allowed_species(restrict_to: list[str], universe: list[str]) -> set[str]:
    allowed = set()
    for name in restrict_to:
        allowed.update(CATALOG.species_under(name))
    return allowed & set(universe)


def ancestors(names: set[str]) -> set[str]:
    return {t for n in names for t in CATALOG.get(n).taxonomy.values()}


def start(root, spec: str, **kw) -> RunningServer:
    return start_server(ServerConfig(model=spec, data_dir=root / "data", port=0,
                                     grace_seconds=1.0, **kw))


@pytest.fixture(scope="module")
def zero_shot(tmp_path_factory, demo_model_spec) -> Iterator[RunningServer]:
    running = start(tmp_path_factory.mktemp("restrict-zs"), demo_model_spec)
    yield running
    running.stop(0.5)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, demo_model_spec, loaded_demo_model) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("restrict-hybrid")
    rng = np.random.default_rng(11)
    bundle_dir = write_bundle(
        root / "bundle", loaded_demo_model, HYBRID_SPECIES,
        unit(rng.normal(size=(len(HYBRID_SPECIES), 512))),
        common=HYBRID_SPECIES[:5],
        thresholds=Thresholds(classifier_high=0.5, classifier_low=0.2, prototype=0.3),
        taxon_thresholds={"genus": 0.6, "family": 0.6, "order": 0.6, "class": 0.6},
        temperature=20.0, seed=5,
    )
    running = start(root, demo_model_spec, bundle=bundle_dir)
    yield running
    running.stop(0.5)


def queries(protos: np.ndarray, n_random: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = protos + 0.02 * rng.normal(size=protos.shape)
    return unit(np.concatenate([protos, noisy, rng.normal(size=(n_random, protos.shape[1]))]))


def stream(stub, embeddings: np.ndarray, restrict_to: list[str], top_k: int):
    requests = (
        pb.IdentifyRequest(embedding=e.tolist(), restrict_to=restrict_to, top_k=top_k,
                           request_id=str(i))
        for i, e in enumerate(embeddings)
    )
    responses = list(stub.IdentifyStream(requests))
    assert [r.request_id for r in responses] == [str(i) for i in range(len(embeddings))]
    return responses


def check_inside(resp: pb.IdentifyResponse, allowed: set[str]) -> None:
    assert not resp.HasField("error"), resp.error.message
    d = resp.decision
    assert d.species == "" or d.species in allowed
    if d.method == pb.METHOD_TAXON:
        assert d.taxon in ancestors(allowed)
    for c in [*resp.prototype_candidates, *resp.classifier_candidates]:
        assert c.species in allowed, f"{c.species} (score {c.score}) outside {sorted(allowed)}"
    for rc in resp.rank_confidences:
        assert rc.taxon in ancestors(allowed)


def test_zero_shot_never_answers_outside_the_set(zero_shot) -> None:
    names = CATALOG.names()
    current = zero_shot.state.identifier.prototypes()  # zero-shot: the text prototypes
    assert list(current.names) == names
    protos = current.vectors
    embeddings = queries(protos, n_random=60, seed=1)
    stub = stub_for(zero_shot)
    answered = 0
    for restrict_to in RESTRICTIONS:
        allowed = allowed_species(restrict_to, names)
        for resp in stream(stub, embeddings, restrict_to, top_k=len(names)):
            check_inside(resp, allowed)
            # Renormalised over the allowed species only: their scores sum to one.
            assert sum(c.score for c in resp.prototype_candidates) == pytest.approx(1.0)
            answered += resp.decision.species != ""
        # An allowed species' own prototype is still recognised under the restriction.
        for name in sorted(allowed)[:3]:
            resp = stub.Identify(pb.IdentifyRequest(
                embedding=protos[names.index(name)].tolist(), restrict_to=restrict_to))
            assert resp.decision.species == name
    assert answered > 0


def test_zero_shot_scores_are_the_unrestricted_ones_renormalised(zero_shot) -> None:
    names = CATALOG.names()
    stub = stub_for(zero_shot)
    query = unit(np.random.default_rng(7).normal(size=512)).tolist()
    full = stub.Identify(pb.IdentifyRequest(embedding=query, top_k=len(names)))
    p_full = {c.species: c.score for c in full.prototype_candidates}
    restrict_to = ["Gastropoda", "Fucus"]
    allowed = allowed_species(restrict_to, names)
    part = stub.Identify(pb.IdentifyRequest(embedding=query, top_k=len(names),
                                            restrict_to=restrict_to))
    total = sum(p_full[n] for n in allowed)
    got = {c.species: c.score for c in part.prototype_candidates}
    assert set(got) == allowed
    for name in allowed:
        assert got[name] == pytest.approx(p_full[name] / total, rel=1e-5, abs=1e-12)


def test_hybrid_never_answers_outside_the_set(hybrid) -> None:
    bundle = hybrid.state.bundle
    embeddings = queries(bundle.prototypes, n_random=60, seed=2)
    stub = stub_for(hybrid)
    methods: dict[int, int] = {}
    for restrict_to in HYBRID_RESTRICTIONS:
        allowed = allowed_species(restrict_to, HYBRID_SPECIES)
        allowed_common = allowed & set(bundle.common)
        for resp in stream(stub, embeddings, restrict_to, top_k=10):
            check_inside(resp, allowed)
            methods[resp.decision.method] = methods.get(resp.decision.method, 0) + 1
            assert sum(c.score for c in resp.prototype_candidates) == pytest.approx(1.0)
            if allowed_common:
                assert sum(c.score for c in resp.classifier_candidates) == pytest.approx(1.0)
    answered = sum(v for k, v in methods.items() if k != pb.METHOD_REJECTED)
    assert answered > 0, methods
    assert methods.get(pb.METHOD_PROTOTYPE, 0) > 0, methods
    classifier = methods.get(pb.METHOD_CLASSIFIER, 0) + methods.get(pb.METHOD_CLASSIFIER_LOW, 0)
    assert classifier > 0, methods


@pytest.mark.parametrize("server_name", ["zero_shot", "hybrid"])
def test_unknown_taxon_is_invalid_argument_naming_it(server_name, request) -> None:
    stub = stub_for(request.getfixturevalue(server_name))
    query = unit(np.ones(512)).tolist()
    with pytest.raises(grpc.RpcError) as info:
        stub.Identify(pb.IdentifyRequest(embedding=query, restrict_to=["Fucus", "Nessiidae"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Nessiidae" in info.value.details()


def test_over_long_list_is_invalid_argument(zero_shot) -> None:
    stub = stub_for(zero_shot)
    names = (CATALOG.names() * 6)[: MAX_RESTRICT_TO + 1]
    with pytest.raises(grpc.RpcError) as info:
        stub.Identify(pb.IdentifyRequest(embedding=unit(np.ones(512)).tolist(),
                                         restrict_to=names))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(MAX_RESTRICT_TO) in info.value.details()
    info_msg = stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert info_msg.limits.max_restrict_to == MAX_RESTRICT_TO
    ok = stub.Identify(pb.IdentifyRequest(embedding=unit(np.ones(512)).tolist(),
                                          restrict_to=names[:MAX_RESTRICT_TO]))
    assert ok.decision.method in (pb.METHOD_ZERO_SHOT, pb.METHOD_REJECTED)


def test_stream_reports_a_bad_restriction_per_item_and_goes_on(zero_shot) -> None:
    stub = stub_for(zero_shot)
    query = unit(np.ones(512)).tolist()
    requests = [
        pb.IdentifyRequest(embedding=query, restrict_to=["Fucus"], request_id="a"),
        pb.IdentifyRequest(embedding=query, restrict_to=["Atlantis"], request_id="b"),
        pb.IdentifyRequest(embedding=query, restrict_to=["Gastropoda"], request_id="c"),
    ]
    a, b, c = stub.IdentifyStream(iter(requests))
    assert b.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "Atlantis" in b.error.message
    check_inside(a, allowed_species(["Fucus"], CATALOG.names()))
    check_inside(c, allowed_species(["Gastropoda"], CATALOG.names()))


def test_species_outside_the_bundle_leave_nothing_to_answer(hybrid) -> None:
    # Birds are in the catalog but not in this bundle: nothing left to score.
    with pytest.raises(grpc.RpcError) as info:
        stub_for(hybrid).Identify(
            pb.IdentifyRequest(embedding=unit(np.ones(512)).tolist(), restrict_to=["Aves"])
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no species" in info.value.details()
