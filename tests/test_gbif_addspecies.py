"""``serve --gbif-url``: AddSpecies with a name only looks it up on (a local) GBIF."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from gbif_fake import FakeGbif, refused_url

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.catalog.store import load_catalog
from conftest import stub_for


@pytest.fixture
def gbif() -> Iterator[FakeGbif]:
    fake = FakeGbif().start()
    yield fake
    fake.stop()


def lineage(species: pb.Species) -> dict[int, str]:
    return {t.rank: t.name for t in species.taxonomy.lineage}


def test_add_species_by_name_uses_gbif(gbif, make_server) -> None:
    running = make_server(gbif_url=gbif.url)
    stub = stub_for(running)

    synonym = stub.AddSpecies(pb.AddSpeciesRequest(
        scientific_name="Monodonta lineata",
        vernacular_names=[pb.VernacularName(name="Bigorneau gris", language="fr")],
    ))
    assert synonym.scientific_name == "Monodonta lineata"  # the user's name is kept
    assert synonym.gbif_status == "SYNONYM" and synonym.gbif_match_type == "EXACT"
    assert synonym.gbif_usage_key == 5192345
    assert lineage(synonym)[pb.RANK_GENUS] == "Phorcus"  # the accepted usage's lineage
    names = [(v.language, v.name) for v in synonym.taxonomy.vernacular_names]
    assert names.index(("fr", "Bigorneau gris")) < names.index(("fr", "Monodonte"))
    assert ("en", "Toothed topshell") in names

    unknown = stub.AddSpecies(pb.AddSpeciesRequest(scientific_name="Nonexistus imaginarius"))
    assert unknown.gbif_match_type == "NONE"
    assert lineage(unknown) == {pb.RANK_SPECIES: "Nonexistus imaginarius"}  # nothing invented

    genus_only = stub.AddSpecies(pb.AddSpeciesRequest(scientific_name="Patella foobarensis"))
    assert genus_only.gbif_match_type == "HIGHERRANK"
    assert lineage(genus_only)[pb.RANK_GENUS] == "Patella"
    assert len(genus_only.taxonomy.vernacular_names) == 0

    # A taxonomy in the request means no look-up at all.
    served = len(gbif.paths("/v1/species/match"))
    given = stub.AddSpecies(pb.AddSpeciesRequest(
        scientific_name="Carcinus maenus",
        taxonomy=pb.Taxonomy(lineage=[pb.Taxon(rank=pb.RANK_GENUS, name="Carcinus")]),
    ))
    assert given.gbif_match_type == "" and len(gbif.paths("/v1/species/match")) == served

    # What AddSpecies learnt is in the overlay the next start (and enrich) reads.
    stored = load_catalog(running.state.config.data_dir).get("Monodonta lineata")
    assert stored.gbif.accepted_name == "Phorcus lineatus"


def test_add_species_with_gbif_down_is_unavailable(make_server) -> None:
    stub = stub_for(make_server(gbif_url=refused_url()))
    with pytest.raises(grpc.RpcError) as info:
        stub.AddSpecies(pb.AddSpeciesRequest(scientific_name="Monodonta lineata"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "GBIF" in info.value.details() and "send the taxonomy" in info.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetSpecies(pb.GetSpeciesRequest(scientific_name="Monodonta lineata"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # nothing half-stored
