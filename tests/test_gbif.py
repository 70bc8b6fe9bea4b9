"""The GBIF client and match policy against a local GBIF-shaped HTTP server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from gbif_fake import FakeGbif, refused_url

from biolit_id.server.catalog.catalog import Catalog, SpeciesRecord
from biolit_id.server.catalog.gbif import (
    GbifClient,
    GbifError,
    GbifUnavailableError,
    apply_lookup,
    lookup_species,
)


@pytest.fixture
def gbif() -> Iterator[FakeGbif]:
    fake = FakeGbif().start()
    yield fake
    fake.stop()


def client_for(url: str, tmp_path=None, **kw) -> GbifClient:
    kw.setdefault("timeout", 2.0)
    kw.setdefault("retries", 2)
    kw.setdefault("backoff", 0.01)
    return GbifClient(url, cache_dir=tmp_path / "gbif-cache" if tmp_path else None, **kw)


def test_exact_match_taxonomy_and_vernacular_names(gbif, tmp_path) -> None:
    lookup = lookup_species(client_for(gbif.url, tmp_path), "Carcinus maenas")
    assert lookup.match.match_type == "EXACT"
    assert lookup.match.status == "ACCEPTED"
    assert lookup.match.usage_key == 2225776
    assert lookup.match.accepted_name == ""
    assert lookup.trusted
    assert lookup.taxonomy == {
        "kingdom": "Animalia", "phylum": "Arthropoda", "class": "Malacostraca",
        "order": "Decapoda", "family": "Carcinidae", "genus": "Carcinus",
    }
    assert lookup.authorship == "(Linnaeus, 1758)"
    # fra/eng -> fr/en, German dropped, preferred first, case-insensitive duplicates merged;
    # 7 names on pages of 3: all three pages were read.
    assert lookup.vernacular == {
        "fr": ["Crabe vert", "Crabe enragé"],
        "en": ["Shore crab", "green crab", "European green crab"],
    }
    assert len(gbif.paths("/v1/species/2225776/vernacularNames")) == 3


def test_exact_match_keeps_curated_first_names(gbif) -> None:
    record = Catalog.load_default().get("Carcinus maenas")
    lookup = lookup_species(client_for(gbif.url), "Carcinus maenas")
    updated = apply_lookup(record, lookup)
    # The first English name feeds the text prompt: enrichment appends, never reorders.
    assert updated.vernacular["en"][: len(record.vernacular["en"])] == record.vernacular["en"]
    assert "Shore crab" in [n.casefold().capitalize() for n in updated.vernacular["en"]]
    assert updated.prompt() == record.prompt()
    assert updated.gbif.match_type == "EXACT"
    assert updated.taxonomy["species"] == "Carcinus maenas"


def test_no_match_stores_no_taxonomy(gbif) -> None:
    lookup = lookup_species(client_for(gbif.url), "Nonexistus imaginarius")
    assert lookup.match.match_type == "NONE"
    assert lookup.taxonomy == {} and lookup.vernacular == {}
    assert not lookup.trusted
    assert gbif.paths("/v1/species/match") and not gbif.paths("/v1/species/0")
    record = apply_lookup(SpeciesRecord("Nonexistus imaginarius"), lookup)
    assert record.taxonomy == {"species": "Nonexistus imaginarius"}
    assert record.gbif.match_type == "NONE"


def test_fuzzy_match_is_recorded_and_never_overwrites(gbif) -> None:
    lookup = lookup_species(client_for(gbif.url), "Carcinus maenus")
    assert lookup.match.match_type == "FUZZY"
    assert lookup.match.accepted_name == "Carcinus maenas"
    assert not lookup.trusted
    curated = SpeciesRecord(
        "Carcinus maenus",
        taxonomy={"kingdom": "Animalia", "family": "Portunidae", "species": "Carcinus maenus"},
        vernacular={"en": ["My crab"]},
    )
    merged = apply_lookup(curated, lookup)
    assert merged.taxonomy["family"] == "Portunidae"  # curated rank kept
    assert merged.taxonomy["genus"] == "Carcinus"  # a missing rank is filled
    assert merged.taxonomy["species"] == "Carcinus maenus"  # the user's name, never GBIF's
    assert merged.vernacular["en"] == ["My crab"]
    assert merged.vernacular["fr"] == ["Crabe vert", "Crabe enragé"]
    assert merged.gbif.match_type == "FUZZY"


def test_synonym_follows_the_accepted_usage(gbif) -> None:
    lookup = lookup_species(client_for(gbif.url), "Monodonta lineata")
    assert lookup.match.status == "SYNONYM"
    assert lookup.match.match_type == "EXACT"
    assert lookup.match.usage_key == 5192345
    assert lookup.match.accepted_name == "Phorcus lineatus"
    assert gbif.paths("/v1/species/7826250?") or gbif.paths("/v1/species/7826250")
    assert lookup.taxonomy["genus"] == "Phorcus" and lookup.taxonomy["family"] == "Trochidae"
    assert lookup.vernacular == {"fr": ["Monodonte"], "en": ["Toothed topshell"]}
    assert not gbif.paths("/v1/species/5192345/")  # names come from the accepted usage
    record = apply_lookup(SpeciesRecord("Monodonta lineata"), lookup)
    assert record.scientific_name == "Monodonta lineata"
    assert record.taxonomy["species"] == "Monodonta lineata"
    assert record.gbif.status == "SYNONYM"
    assert record.authorship == ""  # the synonym's authorship is not the accepted one's


def test_higher_rank_keeps_only_returned_ranks(gbif) -> None:
    lookup = lookup_species(client_for(gbif.url), "Patella foobarensis")
    assert lookup.match.match_type == "HIGHERRANK"
    assert lookup.matched_rank == "GENUS"
    assert lookup.taxonomy["genus"] == "Patella"
    assert "species" not in lookup.taxonomy
    assert lookup.vernacular == {}  # "limpets" names the genus, not this species
    assert not gbif.paths("/v1/species/2300307/vernacularNames")
    record = apply_lookup(SpeciesRecord("Patella foobarensis"), lookup)
    assert record.lineage()[-2:] == [("genus", "Patella"), ("species", "Patella foobarensis")]
    assert record.gbif.match_type == "HIGHERRANK"


def test_server_down_fails_fast_with_bounded_retries() -> None:
    url = refused_url()
    client = client_for(url, retries=2, backoff=0.05)
    t0 = time.monotonic()
    with pytest.raises(GbifUnavailableError, match="unreachable after 3 attempt"):
        lookup_species(client, "Carcinus maenas")
    assert time.monotonic() - t0 < 2.0
    assert client.requests_made == 3
    assert url.rsplit("/v1", 1)[0] in str(client.base_url)


def test_5xx_then_success_retries(gbif) -> None:
    gbif.fail_next = [503, 502]
    client = client_for(gbif.url, retries=3)
    lookup = lookup_species(client, "Carcinus maenas")
    assert lookup.match.match_type == "EXACT"
    assert len(gbif.paths("/v1/species/match")) == 3


def test_429_honours_retry_after_within_the_cap(gbif) -> None:
    gbif.fail_next = [429]
    gbif.retry_after = "0.2"
    client = client_for(gbif.url, retries=1, max_backoff=1.0)
    t0 = time.monotonic()
    assert client.match("Carcinus maenas")["usageKey"] == 2225776
    assert 0.2 <= time.monotonic() - t0 < 1.5


def test_retries_are_bounded_on_persistent_5xx(gbif) -> None:
    gbif.fail_next = [500] * 10
    with pytest.raises(GbifUnavailableError, match="HTTP 500"):
        client_for(gbif.url, retries=2).match("Carcinus maenas")
    assert len(gbif.requests) == 3


def test_client_errors_are_not_retried(gbif) -> None:
    with pytest.raises(GbifError, match="HTTP 404") as info:
        client_for(gbif.url, retries=3).usage(999)
    assert not isinstance(info.value, GbifUnavailableError)
    assert len(gbif.requests) == 1


def test_timeout_counts_as_unavailable(gbif) -> None:
    gbif.delay_s = 1.0
    client = client_for(gbif.url, timeout=0.2, retries=1)
    t0 = time.monotonic()
    with pytest.raises(GbifUnavailableError):
        client.match("Carcinus maenas")
    assert time.monotonic() - t0 < 1.5


def test_disk_cache_answers_when_gbif_is_gone(gbif, tmp_path) -> None:
    first = lookup_species(client_for(gbif.url, tmp_path), "Monodonta lineata")
    served = len(gbif.requests)
    assert list((tmp_path / "gbif-cache").rglob("*.json"))
    again = lookup_species(client_for(gbif.url, tmp_path), "Monodonta lineata")
    assert again == first and len(gbif.requests) == served  # no network the second time
    gbif.stop()
    # Expired entries (max_age 0) are still used when GBIF cannot be reached.
    stale = lookup_species(client_for(gbif.url, tmp_path, max_age_s=0.0, retries=0),
                           "Monodonta lineata")
    assert stale == first


def test_offline_mode_reads_only_the_cache(gbif, tmp_path) -> None:
    client = client_for(gbif.url, tmp_path)
    client.match("Carcinus maenas")
    client.offline = True
    before = len(gbif.requests)
    assert client.match("Carcinus maenas")["matchType"] == "EXACT"
    with pytest.raises(GbifUnavailableError, match="not cached"):
        client.match("Carcinus maenus")
    assert len(gbif.requests) == before


def test_kingdom_hint_and_url_prefix_reach_gbif(gbif) -> None:
    client = client_for(gbif.url + "/")  # trailing slash tolerated
    client.match("Carcinus maenas", kingdom="Animalia")
    (path,) = gbif.paths("/v1/species/match")
    assert "kingdom=Animalia" in path and "name=Carcinus+maenas" in path


def test_bad_url_is_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        GbifClient("api.gbif.org/v1")
