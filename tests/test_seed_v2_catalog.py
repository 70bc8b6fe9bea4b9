"""The catalog holds both seed generations, one consistent tree, every rank's origin recorded."""

from __future__ import annotations

import itertools

import numpy as np

from biolit_id.cli.seedcompat.import_v2 import read_tax_lookup
from biolit_id.cli.seedcompat.import_v4 import load_seed_file
from biolit_id.server.catalog.catalog import LINEAGE_RANKS, Catalog
from conftest import SEED_DIR, SEED_V2_DIR

CATALOG = Catalog.load_default()
TAX = read_tax_lookup(SEED_V2_DIR / "tax_lookup.pkl")


def test_every_species_of_both_generations_is_there_as_its_seed_spells_it() -> None:
    v2 = [str(s) for s in np.load(SEED_V2_DIR / "proto_model.npz")["species_list"]]
    v4 = load_seed_file(SEED_DIR / "prototypes_v4.pt")["idx_to_species"].values()
    by_lower = {n.lower(): n for n in CATALOG.names()}
    assert set(v4) <= set(CATALOG.names())  # exact spelling
    assert all(s in by_lower for s in v2)  # lower-case v2 names -> their proper form
    assert by_lower["lepas (anatifa) anatifera"] == "Lepas (Anatifa) anatifera"
    assert by_lower["echinaster (echinaster) sepositus"] == "Echinaster (Echinaster) sepositus"
    assert len(CATALOG) == 235
    assert len(CATALOG.of_generation("v4")) == 100 and len(CATALOG.of_generation("v2")) == 215
    assert CATALOG.of_generation("v4").names() == CATALOG.names()[:100]  # order kept
    both = {r.scientific_name for r in CATALOG if set(r.generations) == {"v4", "v2"}}
    assert len(both) == 80 and "Patella vulgata" in both


def test_one_tree_and_full_lineages() -> None:
    parent: dict[tuple[str, str], set] = {}
    for record in CATALOG:
        lineage = record.lineage()
        assert lineage[-1] == ("species", record.scientific_name)
        missing = [r for r in LINEAGE_RANKS if not record.taxonomy.get(r)]
        for rank in missing:  # a rank is missing only with the reason recorded
            assert record.taxonomy_source[rank].startswith("not filled:"), (record, rank)
        for (r1, t1), (r2, t2) in itertools.pairwise(lineage):
            parent.setdefault((r2, t2), set()).add((r1, t1))
    assert {k: v for k, v in parent.items() if len(v) > 1} == {}  # each taxon, one parent
    unfilled = {(r.scientific_name, rank) for r in CATALOG for rank, why in
                r.taxonomy_source.items() if why.startswith("not filled")}
    assert unfilled == {("Symsagittifera roscoffensis", "class"), ("Yungia aurantiaca", "class")}


def test_tax_lookup_gaps_are_filled_and_sourced() -> None:
    by_lower = {r.scientific_name.lower(): r for r in CATALOG}
    gaps = {level: [n for n, t in TAX.items() if level not in t]
            for level in ("phylum", "classe", "ordre")}
    assert [len(gaps[k]) for k in ("phylum", "classe", "ordre")] == [12, 3, 5]
    for name in gaps["phylum"]:  # the flowering plants
        record = by_lower[name]
        assert record.taxonomy["phylum"] == "Tracheophyta"
        assert record.taxonomy["class"] in {"Magnoliopsida", "Liliopsida"}
        assert "GBIF" in record.taxonomy_source["phylum"] or "v4" in record.taxonomy_source[
            "phylum"]
    assert by_lower["caretta caretta"].taxonomy["class"] == "Reptilia"
    assert by_lower["elysia viridis"].taxonomy["order"] == "Sacoglossa"
    assert by_lower["patella vulgata"].taxonomy["order"] == "Patellogastropoda"
    for name in gaps["classe"] + gaps["ordre"] + gaps["phylum"]:
        record = by_lower[name]
        for rank in ("phylum", "class", "order"):
            assert record.taxonomy_source.get(rank), (name, rank)


def test_every_rank_says_where_it_came_from() -> None:
    for record in CATALOG:
        assert set(record.taxonomy_source) >= set(record.taxonomy), record.scientific_name
        if record.generations == ("v2",):
            tax = TAX[record.scientific_name.lower()]
            for level, rank in (("regne", "kingdom"), ("famille", "family")):
                if "tax_lookup" in record.taxonomy_source[rank] and "(" not in \
                        record.taxonomy_source[rank].split("TAXREF")[-1]:
                    assert record.taxonomy[rank] == tax[level]
    # the seed v2's known error (Asterias rubens filed under Echinasteridae) is recorded,
    # the catalog keeps the right family
    asterias = CATALOG.get("Asterias rubens")
    assert asterias.taxonomy["family"] == "Asteriidae"
    assert "Echinasteridae" in asterias.taxonomy_source["family"]


def test_record_fields_round_trip() -> None:
    for record in list(CATALOG)[::17]:
        again = type(record).from_json(record.to_json())
        assert again == record
