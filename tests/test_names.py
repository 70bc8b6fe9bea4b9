"""Scientific names are checked where they enter: the grammar, and AddSpecies on both APIs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources

import grpc
import pytest
import requests

from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.app import RunningServer, start_server
from biolit_id.server.catalog.names import (
    MAX_SCIENTIFIC_NAME_LENGTH,
    check_scientific_name,
    check_taxon_name,
)
from biolit_id.server.config import ServerConfig
from conftest import stub_for

MARKUP = '<img src=x onerror="alert(1)">'
CONTROL = "Carcinus\x07 maenas"
OVERLONG = "Carcinus " + "a" * MAX_SCIENTIFIC_NAME_LENGTH  # under the 200-char field limit
TIMEOUT = 60


def shipped_records() -> list[dict]:
    text = resources.files("biolit_id.server").joinpath("data/species_catalog.json").read_text(
        "utf-8")
    return json.loads(text)["species"]


# ------------------------------------------------------------------ the grammar


def test_every_shipped_name_follows_the_grammar() -> None:
    records = shipped_records()
    assert len(records) > 200
    for record in records:
        name = record["scientific_name"]
        assert check_scientific_name(name) == name
        for rank, taxon in record["taxonomy"].items():
            if rank != "species":
                assert check_taxon_name(taxon, rank, group=rank == "genus") == taxon


@pytest.mark.parametrize("name, normalised", [
    ("Carcinus maenas", "Carcinus maenas"),
    ("  Carcinus   maenas ", "Carcinus maenas"),
    ("Patella sp.", "Patella sp."),
    ("Ulva spp.", "Ulva spp."),
    ("Littorina fabalis/obtusata", "Littorina fabalis/obtusata"),
    ("Littorina fabalis / obtusata", "Littorina fabalis/obtusata"),
    ("Magallana gigas / Ostrea edulis", "Magallana gigas / Ostrea edulis"),
    ("Magallana gigas/Ostrea edulis", "Magallana gigas / Ostrea edulis"),
    ("Codium fragile subsp. fragile", "Codium fragile subsp. fragile"),
    ("Haliotis tuberculata tuberculata", "Haliotis tuberculata tuberculata"),
    ("Lepas (Anatifa) anatifera", "Lepas (Anatifa) anatifera"),
    ("Fucus × ceranoides", "Fucus × ceranoides"),
    ("Pecten novae-zelandiae", "Pecten novae-zelandiae"),
    ("Hyas araneus var. alba", "Hyas araneus var. alba"),
])
def test_names_accepted(name: str, normalised: str) -> None:
    assert check_scientific_name(name) == normalised


@pytest.mark.parametrize("name, rule", [
    (MARKUP, "markup"),
    ("Carcinus <b>maenas</b>", "markup"),
    (CONTROL, "control"),
    ("Carcinus\nmaenas", "control"),
    ("Carcinus\u200bmaenas", "invisible"),
    ("Carcinus maenas\u202e", "invisible"),
    (OVERLONG, f"more than the {MAX_SCIENTIFIC_NAME_LENGTH}"),
    ("", "required"),
    ("   ", "required"),
    ("Carcinus maenas (Linnaeus, 1758)", "authorship"),
    ("Carcinus maenas Linnaeus", "authorship"),
    ("Carcinus cf. maenas", "qualifiers"),
    ("Carcinus", "one word"),
    ("carcinus maenas", "genus"),
    ("Carcinus Maenas", "epithets are lower-case"),
    ("Patella sp. vulgata", "expected"),
    ("Crabe_vert", "character"),
    ("Carcinus maenas; DROP TABLE", "markup"),
    ("Carcinus mænas", "character"),
])
def test_names_refused_with_the_rule(name: str, rule: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_scientific_name(name)
    assert rule in str(refused.value), str(refused.value)
    assert "scientific_name" in str(refused.value)


def test_taxon_names() -> None:
    assert check_taxon_name(" Gastropoda ") == "Gastropoda"
    assert check_taxon_name("Magallana/Ostrea", group=True) == "Magallana / Ostrea"
    for bad in ("gastropoda", "Gastropoda sp.", "Magallana / Ostrea", "<b>Fucus</b>", "Fu\tcus"):
        with pytest.raises(InvalidRequestError):
            check_taxon_name(bad, "taxonomy family")


# ------------------------------------------------------------------ both APIs


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_spec: str) -> Iterator[RunningServer]:
    config = ServerConfig(model=demo_model_spec, data_dir=tmp_path_factory.mktemp("names"),
                          port=0, http_port=0, grace_seconds=0.5)
    running = start_server(config)
    yield running
    running.stop(0.5)


BAD_NAMES = {MARKUP: "markup", CONTROL: "control", OVERLONG: "characters"}


@pytest.mark.parametrize("name", list(BAD_NAMES))
def test_add_species_refuses_on_grpc_and_http(server: RunningServer, name: str) -> None:
    stub = stub_for(server)
    with pytest.raises(grpc.RpcError) as refused:
        stub.AddSpecies(pb.AddSpeciesRequest(scientific_name=name), timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert BAD_NAMES[name] in refused.value.details()

    url = server.http.url.rstrip("/")
    answer = requests.post(f"{url}/v1/species", json={"scientificName": name}, timeout=TIMEOUT)
    assert answer.status_code == 400
    body = answer.json()
    assert body == {"code": "INVALID_ARGUMENT", "message": refused.value.details()}
    # Nothing was stored under any spelling of it.
    names = {s.scientific_name for s in stub.ListSpecies(pb.ListSpeciesRequest()).species}
    assert not any("<" in n or "\x07" in n or len(n) > MAX_SCIENTIFIC_NAME_LENGTH for n in names)


def test_taxonomy_fields_are_checked_too(server: RunningServer) -> None:
    stub = stub_for(server)
    request = pb.AddSpeciesRequest(
        scientific_name="Goniodoris castanea",
        taxonomy=pb.Taxonomy(lineage=[pb.Taxon(rank=pb.RANK_FAMILY, name=MARKUP)]))
    with pytest.raises(grpc.RpcError) as refused:
        stub.AddSpecies(request, timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "taxonomy family" in refused.value.details()
    assert "markup" in refused.value.details()


def test_valid_new_names_are_accepted_on_both(server: RunningServer) -> None:
    stub = stub_for(server)
    added = stub.AddSpecies(pb.AddSpeciesRequest(
        scientific_name="Goniodoris  castanea",
        taxonomy=pb.Taxonomy(lineage=[pb.Taxon(rank=pb.RANK_GENUS, name="Goniodoris")])),
        timeout=TIMEOUT)
    assert added.scientific_name == "Goniodoris castanea"  # spaces normalised
    url = server.http.url.rstrip("/")
    created = requests.post(f"{url}/v1/species", timeout=TIMEOUT, json={
        "scientificName": "Polycera quadrilineata",
        "taxonomy": {"lineage": [{"rank": "RANK_FAMILY", "name": "Polyceridae"}]}})
    assert created.status_code == 200, created.text
    assert created.json()["scientificName"] == "Polycera quadrilineata"
