"""Darwin Core out: the terms of an answer, the HTTP route, infer-csv --format dwc, export-dwca.

The archive is read back with python-dwca-reader (a maintained DwC-A reader), not with
our own code.
"""

from __future__ import annotations

import base64
import csv
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests
from dwca.read import DwCAReader
from gbif_fake import FakeGbif
from PIL import Image

from biolit_id.cli.darwin_core.archive import ArchiveError, read_rows, write_archive
from biolit_id.cli.darwin_core.rows import photo_event
from biolit_id.cli.main import main as cli
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.app import RunningServer, start_server
from biolit_id.server.config import ServerConfig
from biolit_id.server.grpc.darwin_core import (
    DWC,
    PREDICTED_BY_MACHINE,
    REQUIRED,
    TERMS,
    Event,
    occurrence,
)
from conftest import photo_bytes, photo_folder, stub_for

TIMEOUT = 60
WHEN = datetime(2025, 5, 4, 12, 0, tzinfo=timezone.utc)
VERSIONS = pb.Versions(model_id="hf-hub:imageomics/bioclip", model_fingerprint="abc123",
                       bundle_id="bundle-7", catalog_version="cat-1", service_version="0.1.0")
PATELLA_LINEAGE = [("kingdom", "Animalia"), ("phylum", "Mollusca"), ("class", "Gastropoda"),
                   ("order", "Patellogastropoda"), ("family", "Patellidae"),
                   ("genus", "Patella")]
PB_RANKS = {"kingdom": pb.RANK_KINGDOM, "phylum": pb.RANK_PHYLUM, "class": pb.RANK_CLASS,
            "order": pb.RANK_ORDER, "family": pb.RANK_FAMILY, "genus": pb.RANK_GENUS,
            "species": pb.RANK_SPECIES}


def taxonomy(pairs) -> pb.Taxonomy:
    return pb.Taxonomy(lineage=[pb.Taxon(rank=PB_RANKS[r], name=n) for r, n in pairs])


# ------------------------------------------------------------------ the terms


def test_species_answer_with_gbif_key_place_and_date() -> None:
    decision = pb.Decision(species="Patella vulgata", confidence=0.91234,
                           method=pb.METHOD_FUSED, rank=pb.RANK_SPECIES,
                           taxon="Patella vulgata")
    species = pb.Species(scientific_name="Patella vulgata", rank=pb.RANK_SPECIES,
                         gbif_usage_key=2300313)
    record = occurrence(decision, taxonomy([*PATELLA_LINEAGE, ("species", "Patella vulgata")]),
                        VERSIONS, species=species, occurrence_id="obs-1",
                        event=Event("2024-06-01", 48.3904, -4.4833, 25.0), identified_at=WHEN)
    terms = record.terms
    assert record.exportable and list(terms) == list(TERMS)
    assert terms["scientificName"] == "Patella vulgata" and terms["taxonRank"] == "species"
    assert [terms[r] for r, _ in PATELLA_LINEAGE] == [n for _, n in PATELLA_LINEAGE]
    assert terms["taxonID"] == "https://www.gbif.org/species/2300313"
    assert terms["nameAccordingTo"] == "GBIF Backbone Taxonomy"
    assert terms["identificationVerificationStatus"] == PREDICTED_BY_MACHINE
    assert "abc123" in terms["identificationReferences"]
    assert "bundle bundle-7" in terms["identificationReferences"]
    assert terms["identificationRemarks"].startswith("confidence 0.912 (calibrated); "
                                                     "method METHOD_FUSED")
    assert terms["dateIdentified"] == "2025-05-04T12:00:00Z"
    assert (terms["eventDate"], terms["decimalLatitude"], terms["decimalLongitude"],
            terms["geodeticDatum"], terms["coordinateUncertaintyInMeters"]) == \
        ("2024-06-01", "48.3904", "-4.4833", "WGS84", "25")
    assert terms["occurrenceID"] == "obs-1"


def test_rank_answers_genus_entries_groups_and_rejections() -> None:
    # The species was rejected, the genus was not: exported at the genus.
    taxon = pb.Decision(confidence=0.8, method=pb.METHOD_TAXON, rank=pb.RANK_GENUS,
                        taxon="Patella")
    record = occurrence(taxon, taxonomy(PATELLA_LINEAGE), VERSIONS, identified_at=WHEN)
    assert record.exportable
    assert (record.terms["scientificName"], record.terms["taxonRank"]) == ("Patella", "genus")
    assert record.terms["family"] == "Patellidae" and record.terms["taxonID"] == ""
    assert "METHOD_TAXON" in record.terms["identificationRemarks"]
    # The catalog's genus-level entry "Patella sp." is the genus Patella.
    sp = pb.Decision(species="Patella sp.", confidence=0.7, method=pb.METHOD_ZERO_SHOT,
                     rank=pb.RANK_SPECIES, taxon="Patella sp.")
    terms = occurrence(sp, taxonomy(PATELLA_LINEAGE), VERSIONS,
                       species=pb.Species(rank=pb.RANK_GENUS)).terms
    assert (terms["scientificName"], terms["taxonRank"], terms["verbatimIdentification"]) == \
        ("Patella", "genus", "Patella sp.")
    assert "(uncalibrated)" in terms["identificationRemarks"]
    assert "no bundle (zero-shot)" in occurrence(sp, pb.Taxonomy(), pb.Versions()).terms[
        "identificationReferences"]
    group = pb.Decision(species="Littorina fabalis/obtusata", confidence=0.6,
                        method=pb.METHOD_FUSED, rank=pb.RANK_SPECIES)
    terms = occurrence(group, pb.Taxonomy(), VERSIONS,
                       species=pb.Species(rank=pb.RANK_SPECIES_GROUP)).terms
    assert terms["taxonRank"] == "speciesAggregate"
    # Nothing passed: no taxon, not exportable; the event is still described.
    rejected = occurrence(pb.Decision(method=pb.METHOD_REJECTED, confidence=0.2),
                          pb.Taxonomy(), VERSIONS, event=Event("2024-06-01"))
    assert not rejected.exportable
    assert rejected.terms["scientificName"] == rejected.terms["taxonRank"] == ""
    assert rejected.terms["identificationRemarks"].startswith("not identified")
    assert rejected.terms["eventDate"] == "2024-06-01"
    assert rejected.terms["decimalLatitude"] == rejected.terms["geodeticDatum"] == ""


def test_archive_refuses_bad_rows(tmp_path: Path) -> None:
    base = occurrence(pb.Decision(taxon="Patella", rank=pb.RANK_GENUS, confidence=0.8,
                                  method=pb.METHOD_TAXON), taxonomy(PATELLA_LINEAGE),
                      VERSIONS, occurrence_id="a.jpg").terms
    with pytest.raises(ArchiveError, match="repeated"):
        write_archive([base, dict(base)], tmp_path / "dup.zip")
    with pytest.raises(ArchiveError, match="occurrenceID"):
        write_archive([{**base, "occurrenceID": ""}], tmp_path / "noid.zip")
    (tmp_path / "seed.csv").write_text("image,espece_pred\na.jpg,Patella\n", "utf-8")
    with pytest.raises(ArchiveError, match="not a Darwin Core CSV"):
        read_rows(tmp_path / "seed.csv")
    # A tab or newline in a value cannot break the tab-separated core.
    written = write_archive([{**base, "identificationRemarks": "a\tb\nc"}],
                            tmp_path / "ok.zip", id_prefix="urn:x:")
    with DwCAReader(str(written.path)) as archive:
        (row,) = archive.rows
        assert row.data[DWC + "identificationRemarks"] == "a b c"
        assert row.id == "urn:x:a.jpg"


# ------------------------------------------------------------------ the HTTP route


@pytest.fixture(scope="module")
def gbif() -> Iterator[FakeGbif]:
    fake = FakeGbif().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_spec: str, gbif: FakeGbif) -> Iterator[RunningServer]:
    config = ServerConfig(model=demo_model_spec, data_dir=tmp_path_factory.mktemp("dwc"),
                          port=0, http_port=0, grace_seconds=0.5, gbif_url=gbif.url)
    running = start_server(config)
    yield running
    running.stop(0.5)


def test_route_gives_an_observations_terms(server: RunningServer) -> None:
    stub = stub_for(server)
    added = stub.AddSpecies(pb.AddSpeciesRequest(scientific_name="Monodonta lineata"))
    assert added.gbif_usage_key == 5192345  # from the (fake) GBIF look-up
    url = server.http.url.rstrip("/")
    photos = [{"image": base64.b64encode(photo_bytes(seed)).decode()} for seed in (1, 2)]
    body = {"photos": photos, "observedOn": "2024-06-01", "requestId": "obs-42",
            "location": {"latitude": 48.3904, "longitude": -4.4833, "uncertaintyM": 25},
            "restrictTo": ["Monodonta lineata"]}
    answer = requests.post(f"{url}/v1/identify-observation/dwc", json=body, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    plain = requests.post(f"{url}/v1/identify-observation", json=body, timeout=TIMEOUT).json()
    got = answer.json()
    terms = got["occurrence"]
    assert got["exportable"] is True and set(terms) == set(TERMS)
    assert plain["decision"]["species"] == terms["scientificName"] == "Monodonta lineata"
    assert terms["taxonRank"] == "species" and terms["genus"] == "Phorcus"
    assert terms["taxonID"] == "https://www.gbif.org/species/5192345"
    assert terms["occurrenceID"] == "obs-42"
    assert (terms["eventDate"], terms["decimalLatitude"], terms["decimalLongitude"],
            terms["coordinateUncertaintyInMeters"]) == ("2024-06-01", "48.3904", "-4.4833",
                                                        "25")
    assert terms["identificationVerificationStatus"] == "PredictedByMachine"
    info = stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert info.versions.model_fingerprint in terms["identificationReferences"]
    assert plain["decision"]["method"] in terms["identificationRemarks"]
    assert f"confidence {plain['decision']['confidence']:.3f}" in terms["identificationRemarks"]
    assert all(terms[t] for t in REQUIRED)

    # Without place or date, those terms stay empty; the answer is whatever it is.
    bare = requests.post(f"{url}/v1/identify-observation/dwc", timeout=TIMEOUT,
                         json={"photos": photos[:1]}).json()
    assert bare["occurrence"]["eventDate"] == bare["occurrence"]["decimalLatitude"] == ""
    assert bare["exportable"] == bool(bare["occurrence"]["scientificName"])
    # Bad input is the observation route's error, same code.
    bad = requests.post(f"{url}/v1/identify-observation/dwc", timeout=TIMEOUT,
                        json={"photos": photos, "observedOn": "yesterday"})
    assert bad.status_code == 400 and bad.json()["code"] == "INVALID_ARGUMENT"


# ------------------------------------------------------------------ infer-csv, export-dwca

EXIF_DATE = "2024:06:01 10:30:00"


def add_exif(path: Path, latitude: tuple[float, float, float], north: bool,
             longitude: tuple[float, float, float], east: bool) -> None:
    with Image.open(path) as img:
        img.load()
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9003] = EXIF_DATE
        gps = exif.get_ifd(0x8825)
        gps.update({1: "N" if north else "S", 2: latitude, 3: "E" if east else "W",
                    4: longitude})
        img.save(path, exif=exif)


def test_infer_csv_dwc_then_export_dwca_for_100_photos(tmp_path: Path,
                                                       demo_model_spec: str) -> None:
    photos = photo_folder(tmp_path / "photos", 100, seed=5)
    for i in range(5):
        add_exif(photos / f"p{i}.jpg", (48.0, 23.0, 25.44), True, (4.0, 29.0, 0.0), False)
    event = photo_event(photos / "p0.jpg")
    assert event.date == "2024-06-01T10:30:00"
    assert event.latitude == pytest.approx(48.3904)
    assert event.longitude == pytest.approx(-(4 + 29 / 60))

    out = tmp_path / "out" / "dwc.csv"
    common = ["--model", demo_model_spec, "--data-dir", str(tmp_path / "data")]
    assert cli(["infer-csv", "--images", str(photos), "--output", str(out), "--format", "dwc",
                "--batch-size", "32", *common]) == 0
    with open(out, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == TERMS
        rows = list(reader)
    assert len(rows) == 100
    identified = {r["occurrenceID"]: r for r in rows if r["scientificName"]}
    rejected = {r["occurrenceID"] for r in rows if not r["scientificName"]}
    assert identified and rejected  # the demo model rejects some photos
    assert all(r["taxonRank"] == "" and r["identificationRemarks"].startswith("not identified")
               for r in rows if r["occurrenceID"] in rejected)

    archive_path = tmp_path / "out" / "biolit.zip"
    assert cli(["export-dwca", "--csv", str(out), "--output", str(archive_path),
                "--title", "Test <export> & co"]) == 0
    with DwCAReader(str(archive_path)) as archive:
        assert archive.descriptor.core.type == DWC + "Occurrence"
        assert archive.metadata is not None  # eml.xml parsed
        assert "Test <export> & co" in archive.metadata.find("dataset/title").text
        core_terms = set(archive.descriptor.core.terms)
        assert {DWC + t for t in TERMS} <= core_terms
        seen = {}
        for row in archive:
            assert all(row.data[DWC + t] for t in REQUIRED), row.id
            assert row.data[DWC + "identificationVerificationStatus"] == "PredictedByMachine"
            assert row.data[DWC + "identifiedBy"].startswith("biolit-id")
            seen[row.id] = row.data
    assert set(seen) == set(identified)  # the rejected photos are not occurrences
    for name, data in seen.items():
        assert data[DWC + "scientificName"] == identified[name]["scientificName"]
        if name in {f"p{i}.jpg" for i in range(5)}:
            assert data[DWC + "eventDate"] == "2024-06-01T10:30:00"
            assert (data[DWC + "decimalLatitude"], data[DWC + "decimalLongitude"]) == \
                ("48.3904", "-4.483333")
        else:
            assert data[DWC + "eventDate"] == data[DWC + "decimalLatitude"] == ""

    # Straight from the photos: the same occurrences.
    direct = tmp_path / "out" / "direct.zip"
    assert cli(["export-dwca", "--images", str(photos), "--output", str(direct),
                "--id-prefix", "urn:biolit:", "--", *common]) == 0
    with DwCAReader(str(direct)) as archive:
        assert {r.id for r in archive} == {f"urn:biolit:{n}" for n in identified}
