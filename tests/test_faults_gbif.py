"""GBIF slow or down under a running server: AddSpecies never hangs past its deadline.

The local fake GBIF really delays its answers (or the port refuses); with an
explicit taxonomy AddSpecies needs no GBIF at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from gbif_fake import FakeGbif, refused_url

from biolit_id.proto import identification_pb2 as pb
from conftest import stub_for

WITH_TAXONOMY = pb.Taxonomy(lineage=[pb.Taxon(rank=pb.RANK_FAMILY, name="Carcinidae"),
                                     pb.Taxon(rank=pb.RANK_GENUS, name="Carcinus")])


@pytest.fixture
def slow_gbif() -> Iterator[FakeGbif]:
    fake = FakeGbif().start()
    fake.delay_s = 30.0  # far past any deadline below
    yield fake
    fake.stop()


def test_slow_gbif_fails_fast_with_unavailable_before_the_deadline(slow_gbif, make_server):
    stub = stub_for(make_server(gbif_url=slow_gbif.url))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.AddSpecies(pb.AddSpeciesRequest(scientific_name="Monodonta lineata"), timeout=2.0)
    elapsed = time.monotonic() - started
    # UNAVAILABLE (the server gave up in time), not DEADLINE_EXCEEDED (it was still waiting).
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert "GBIF" in info.value.details() and "send the taxonomy" in info.value.details()
    assert elapsed < 2.0
    assert slow_gbif.paths("/v1/species/match")  # it did try


def test_slow_gbif_without_a_client_deadline_is_bounded(slow_gbif, make_server):
    stub = stub_for(make_server(gbif_url=slow_gbif.url))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.AddSpecies(pb.AddSpeciesRequest(scientific_name="Monodonta lineata"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 10.0  # the server's own look-up budget


@pytest.mark.parametrize("where", ["slow", "down"])
def test_explicit_taxonomy_needs_no_gbif(slow_gbif, make_server, where):
    url = slow_gbif.url if where == "slow" else refused_url()
    stub = stub_for(make_server(gbif_url=url))
    started = time.monotonic()
    species = stub.AddSpecies(pb.AddSpeciesRequest(scientific_name="Carcinus exemplaris",
                                                   taxonomy=WITH_TAXONOMY), timeout=5.0)
    assert time.monotonic() - started < 2.0
    assert species.scientific_name == "Carcinus exemplaris"
    assert {t.rank: t.name for t in species.taxonomy.lineage}[pb.RANK_GENUS] == "Carcinus"
    assert not slow_gbif.paths("/v1/species/match")
    # And the species is usable at once.
    assert stub.GetSpecies(pb.GetSpeciesRequest(scientific_name="Carcinus exemplaris"))


def test_gbif_back_after_an_outage_serves_again(make_server):
    fake = FakeGbif().start()
    try:
        fake.fail_next = [503] * 50  # down (5xx) for a while
        stub = stub_for(make_server(gbif_url=fake.url))
        with pytest.raises(grpc.RpcError) as info:
            stub.AddSpecies(pb.AddSpeciesRequest(scientific_name="Monodonta lineata"),
                            timeout=5.0)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        fake.fail_next = []
        got = stub.AddSpecies(pb.AddSpeciesRequest(scientific_name="Monodonta lineata"),
                              timeout=5.0)
        assert got.gbif_match_type == "EXACT"
    finally:
        fake.stop()
