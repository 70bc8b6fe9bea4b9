"""``biolit-id enrich`` against a local GBIF, the overlay it writes, and a server reading it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gbif_fake import FakeGbif, refused_url

from biolit_id.cli.main import main as cli
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.catalog.catalog import Catalog, SpeciesRecord
from biolit_id.server.catalog.store import (
    CatalogStoreError,
    load_catalog,
    overlay_path,
    save_records,
)
from conftest import stub_for

DEFAULT = Catalog.load_default()


@pytest.fixture
def gbif() -> Iterator[FakeGbif]:
    fake = FakeGbif().start()
    yield fake
    fake.stop()


def enrich(data_dir: Path, url: str, *extra: str) -> int:
    return cli(["enrich", "--data-dir", str(data_dir), "--gbif-url", url, *extra])


def test_enrich_writes_an_overlay_the_catalog_loads(gbif, tmp_path, capsys) -> None:
    code = enrich(tmp_path, gbif.url, "--species", "Carcinus maenas", "Patella sp.")
    assert code == 0
    out = capsys.readouterr().out
    assert "EXACT 1" in out and "NONE 1" in out
    assert "Patella sp.: NONE" in out  # listed for review
    catalog = load_catalog(tmp_path)
    assert catalog.names() == DEFAULT.names()  # order (prototype rows) unchanged
    assert catalog.version.startswith(DEFAULT.version + "+")
    crab, old = catalog.get("Carcinus maenas"), DEFAULT.get("Carcinus maenas")
    assert crab.gbif.match_type == "EXACT" and crab.gbif.usage_key == 2225776
    assert crab.vernacular["en"][: len(old.vernacular["en"])] == old.vernacular["en"]
    assert "Shore crab" in crab.vernacular["en"]
    assert crab.taxonomy == old.taxonomy  # GBIF agrees with the curated lineage
    limpet = catalog.get("Patella sp.")
    assert limpet.gbif.match_type == "NONE"
    assert limpet.taxonomy == DEFAULT.get("Patella sp.").taxonomy  # nothing invented or lost
    untouched = catalog.get("Fucus serratus")
    assert untouched == DEFAULT.get("Fucus serratus")


def test_second_run_changes_nothing_and_uses_the_cache(gbif, tmp_path, capsys) -> None:
    assert enrich(tmp_path, gbif.url, "--species", "Carcinus maenas") == 0
    before = overlay_path(tmp_path).read_bytes()
    served = len(gbif.requests)
    assert enrich(tmp_path, gbif.url, "--species", "Carcinus maenas") == 0
    assert "no species changed" in capsys.readouterr().out
    assert len(gbif.requests) == served
    assert overlay_path(tmp_path).read_bytes() == before


def test_offline_keeps_existing_data_and_says_so(gbif, tmp_path, capsys) -> None:
    assert enrich(tmp_path, gbif.url, "--species", "Carcinus maenas") == 0
    before = overlay_path(tmp_path).read_bytes()
    capsys.readouterr()
    t0 = time.monotonic()
    code = enrich(tmp_path, refused_url(), "--retries", "1")  # every catalog species
    elapsed = time.monotonic() - t0
    captured = capsys.readouterr()
    assert code == 3
    assert "GBIF unreachable" in captured.err
    assert f"kept the existing taxonomy and names of {len(DEFAULT)} species" in captured.err
    assert overlay_path(tmp_path).read_bytes() == before
    assert load_catalog(tmp_path).get("Carcinus maenas").gbif.match_type == "EXACT"
    assert elapsed < 10  # one outage, then cache-only: not a round of retries per species


def test_dry_run_writes_nothing(gbif, tmp_path, capsys) -> None:
    assert enrich(tmp_path, gbif.url, "--species", "Carcinus maenas", "--dry-run") == 0
    assert "would be updated" in capsys.readouterr().out
    assert not overlay_path(tmp_path).exists()


def test_unknown_species_is_refused(gbif, tmp_path, capsys) -> None:
    assert enrich(tmp_path, gbif.url, "--species", "Carcinus maenas", "Nessie lochnessi") == 2
    assert "Nessie lochnessi" in capsys.readouterr().err
    assert gbif.requests == []


def test_runtime_synonym_is_recorded_for_review(gbif, tmp_path, capsys) -> None:
    save_records(tmp_path, [SpeciesRecord("Monodonta lineata", added_at_runtime=True)])
    assert enrich(tmp_path, gbif.url, "--species", "Monodonta lineata") == 0
    assert "Monodonta lineata: EXACT/SYNONYM -> Phorcus lineatus" in capsys.readouterr().out
    record = load_catalog(tmp_path).get("Monodonta lineata")
    assert record.added_at_runtime
    assert record.gbif.status == "SYNONYM" and record.gbif.accepted_name == "Phorcus lineatus"
    assert record.taxon_at("genus") == "Phorcus"
    assert load_catalog(tmp_path).names()[-1] == "Monodonta lineata"


def test_corrupt_overlay_is_a_clear_error(tmp_path, capsys) -> None:
    overlay_path(tmp_path).write_text("{not json", "utf-8")
    with pytest.raises(CatalogStoreError, match=r"catalog\.json"):
        load_catalog(tmp_path)
    assert enrich(tmp_path, "http://127.0.0.1:9/v1") == 1
    assert "catalog.json" in capsys.readouterr().err


def test_server_starts_with_the_enriched_catalog(gbif, tmp_path, make_server) -> None:
    data_dir = tmp_path / "data"  # make_server's data directory
    assert enrich(data_dir, gbif.url, "--species", "Carcinus maenas") == 0
    save_records(data_dir, [SpeciesRecord("Monodonta lineata", added_at_runtime=True)])
    stub = stub_for(make_server())
    species = stub.GetSpecies(pb.GetSpeciesRequest(scientific_name="Carcinus maenas"))
    assert species.gbif_match_type == "EXACT" and species.gbif_usage_key == 2225776
    assert "Shore crab" in {v.name for v in species.taxonomy.vernacular_names}
    listed = stub.ListSpecies(pb.ListSpeciesRequest()).species
    assert len(listed) == len(DEFAULT) + 1 and listed[-1].added_at_runtime
    info = stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert info.versions.catalog_version == load_catalog(data_dir).version != DEFAULT.version
