"""Answers above species level, over real gRPC with a constructed hybrid bundle.

Two congeneric limpets get near-identical prototypes: a photo between them
splits the species mass about evenly, so the species is rejected, but the
genus mass is almost all of it and passes its calibrated threshold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
from synthetic_bundle import unit, write_bundle

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.app import RunningServer, start_server
from biolit_id.server.config import ServerConfig
from biolit_id.server.decision.ranks import taxon_fallback
from biolit_id.server.decision.seed_cascade import SeedCascadeScorer
from biolit_id.server.decision.types import Method, RankAnswer, Thresholds
from biolit_id.server.inference.pipeline import Identifier
from biolit_id.server.inference.types import IdentifyOptions
from conftest import stub_for

SPECIES = [
    "Patella vulgata", "Patella caerulea",  # same genus
    "Steromphala umbilicalis", "Phorcus lineatus",  # same family (Trochidae), two genera
    "Carcinus maenas", "Fucus serratus", "Mytilus edulis", "Asterias rubens",
]
TAXON_THRESHOLDS = {"genus": 0.8, "family": 0.8, "order": 0.85, "class": 0.9}


def prototypes(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(len(SPECIES), 512))
    vecs[1] = vecs[0] + 0.05 * rng.normal(size=512)  # the two limpets: near-identical
    vecs[3] = vecs[2] + 0.05 * rng.normal(size=512)  # the two topshells too
    return unit(vecs)


PROTOS = prototypes()


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_spec, loaded_demo_model) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("taxonomy")
    bundle_dir = write_bundle(
        root / "bundle", loaded_demo_model, SPECIES, PROTOS,
        thresholds=Thresholds(prototype=0.6), taxon_thresholds=TAXON_THRESHOLDS,
    )
    running = start_server(ServerConfig(model=demo_model_spec, data_dir=root / "data", port=0,
                                        grace_seconds=1.0, bundle=bundle_dir))
    yield running
    running.stop(0.5)


def between(*names: str) -> list[float]:
    return unit(sum(PROTOS[SPECIES.index(n)] for n in names)).tolist()


def identify(server, embedding, **kw) -> pb.IdentifyResponse:
    return stub_for(server).Identify(pb.IdentifyRequest(embedding=embedding, top_k=8, **kw))


def test_split_between_congeners_answers_the_genus(server) -> None:
    resp = identify(server, between("Patella vulgata", "Patella caerulea"))
    top = resp.prototype_candidates
    assert {c.species for c in top[:2]} == {"Patella vulgata", "Patella caerulea"}
    assert max(c.score for c in top) < 0.6  # the species itself is not sure enough
    d = resp.decision
    assert d.method == pb.METHOD_TAXON
    assert d.rank == pb.RANK_GENUS and d.taxon == "Patella"
    assert d.species == ""
    assert d.confidence >= TAXON_THRESHOLDS["genus"]
    assert d.confidence == pytest.approx(top[0].score + top[1].score, abs=1e-6)
    lineage = [(t.rank, t.name) for t in resp.taxonomy.lineage]
    assert lineage[-1] == (pb.RANK_GENUS, "Patella")
    assert (pb.RANK_FAMILY, "Patellidae") in lineage
    assert pb.RANK_SPECIES not in [r for r, _ in lineage]
    assert len(resp.taxonomy.vernacular_names) == 0  # species names do not name the genus
    by_rank = {rc.rank: rc for rc in resp.rank_confidences}
    assert by_rank[pb.RANK_GENUS].taxon == "Patella"
    assert by_rank[pb.RANK_GENUS].confidence == pytest.approx(d.confidence)


def test_split_across_genera_answers_the_family(server) -> None:
    resp = identify(server, between("Steromphala umbilicalis", "Phorcus lineatus"))
    d = resp.decision
    by_rank = {rc.rank: rc for rc in resp.rank_confidences}
    assert by_rank[pb.RANK_GENUS].confidence < TAXON_THRESHOLDS["genus"]
    assert d.method == pb.METHOD_TAXON
    assert (d.rank, d.taxon, d.species) == (pb.RANK_FAMILY, "Trochidae", "")
    assert [t.name for t in resp.taxonomy.lineage][-1] == "Trochidae"


def test_a_sure_species_is_still_a_species_answer(server) -> None:
    resp = identify(server, PROTOS[SPECIES.index("Carcinus maenas")].tolist())
    d = resp.decision
    assert d.method == pb.METHOD_PROTOTYPE
    assert (d.species, d.taxon, d.rank) == ("Carcinus maenas", "Carcinus maenas", pb.RANK_SPECIES)


def test_mass_spread_across_classes_stays_rejected(server) -> None:
    resp = identify(server, between("Carcinus maenas", "Fucus serratus", "Mytilus edulis"))
    d = resp.decision
    assert d.method == pb.METHOD_REJECTED
    assert (d.species, d.taxon, d.rank) == ("", "", pb.RANK_UNSPECIFIED)
    names = {pb.RANK_GENUS: "genus", pb.RANK_FAMILY: "family", pb.RANK_ORDER: "order",
             pb.RANK_CLASS: "class"}
    assert len(resp.rank_confidences) == 4
    for rc in resp.rank_confidences:
        assert rc.confidence < TAXON_THRESHOLDS[names[rc.rank]]


def test_restriction_to_one_congener_gives_back_the_species(server) -> None:
    resp = identify(server, between("Patella vulgata", "Patella caerulea"),
                    restrict_to=["Patella vulgata", "Carcinus maenas"])
    d = resp.decision
    assert d.method == pb.METHOD_PROTOTYPE and d.species == "Patella vulgata"
    assert d.confidence > 0.99


def test_without_calibrated_thresholds_there_is_no_fallback(server) -> None:
    state = server.state
    bare = dataclasses.replace(state.bundle, taxon_thresholds={})
    identifier = Identifier(state.catalog, state.embedder, SeedCascadeScorer(bare),
                            state.identifier.prototypes, state.identifier.policy)
    query = np.asarray(between("Patella vulgata", "Patella caerulea"), dtype=np.float32)
    (result,) = identifier.identify_embeddings(query[None, :], [IdentifyOptions()])
    assert result.method == Method.REJECTED
    assert (result.species, result.rank, result.taxon) == ("", "", "")
    genus = {a.rank: a for a in result.rank_confidences}["genus"]
    assert genus.taxon == "Patella" and genus.confidence > 0.99  # reported, not answered


def test_fallback_picks_the_finest_passing_rank() -> None:
    answers = [RankAnswer("genus", "Fucus", 0.7), RankAnswer("family", "Fucaceae", 0.85),
               RankAnswer("order", "Fucales", 0.95), RankAnswer("class", "Phaeophyceae", 0.99)]
    bundle = dataclasses.make_dataclass("B", [("taxon_thresholds", dict)])
    assert taxon_fallback(answers, bundle(TAXON_THRESHOLDS)).taxon == "Fucaceae"
    assert taxon_fallback(answers, bundle({"genus": 0.6})).taxon == "Fucus"
    assert taxon_fallback(answers, bundle({"class": 0.999})) is None
    assert taxon_fallback(answers, None) is None
