"""Per-rank heads of our own ``train``: aligned rows, answers that agree with the species mass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic_bundle import unit, write_bundle

from biolit_id.cli.training.rank_heads import (
    RankHeadSettings,
    rank_labels,
    rank_training_set,
    train_rank_head,
    train_rank_heads,
)
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import load_bundle
from biolit_id.server.decision.rank_heads import RankHeads
from biolit_id.server.decision.rank_heads_scorer import agreed_distribution
from biolit_id.server.decision.types import Thresholds
from conftest import stub_for

CATALOG = Catalog.load_default()
FAST = RankHeadSettings(epochs=15)
# Two species without a class come first, as in the seed's tax_lookup: a trainer that
# re-indexes the kept rows and then takes features by the new index shifts every label.
SPECIES = ["Symsagittifera roscoffensis", "Yungia aurantiaca", "Carcinus maenas",
           "Patella vulgata", "Fucus serratus", "Actinia equina", "Mytilus edulis",
           "Asterias rubens"]


def photos(rng: np.random.Generator, per_species: int = 40, dim: int = 64
           ) -> tuple[np.ndarray, list[str]]:
    """Photos clustered by class: each class its own direction, plus noise."""
    classes = {}
    rows, names = [], []
    for name in SPECIES:
        c = CATALOG.get(name).taxon_at("class") or name
        classes.setdefault(c, unit(rng.normal(size=dim)))
        rows.append(unit(classes[c] + 0.25 * rng.normal(size=(per_species, dim)) / np.sqrt(dim)))
        names += [name] * per_species
    order = rng.permutation(len(names))  # photos of every species interleaved
    return np.concatenate(rows)[order], [names[i] for i in order]


def test_training_rows_pair_each_label_with_its_own_photo() -> None:
    features = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    labels = np.array(["", "A", "", "B", "A", "", "B", "A", "B", ""], dtype=object)
    rows, x, y = rank_training_set(features, labels)
    assert rows.tolist() == [1, 3, 4, 6, 7, 8]
    assert x[:, 0].tolist() == rows.tolist()  # photo i's feature with photo i's label
    assert y.tolist() == labels[rows].tolist()
    # the seed v2's indexing (REFERENCE.md §3) pairs them wrongly: this check would fail it
    seed_x = features[np.arange(len(rows))]
    assert seed_x[:, 0].tolist() != rows.tolist()


def test_a_head_learns_only_when_rows_are_aligned() -> None:
    rng = np.random.default_rng(0)
    x, species = photos(rng)
    labels = rank_labels(species, CATALOG, "class")
    assert sum(1 for t in labels if not t) == 80  # the two species without a class
    rows, xs, ys = rank_training_set(x, labels)
    head = train_rank_head(xs, ys, "class", FAST)
    accuracy = np.mean(np.array(head.labels)[head.probabilities(xs).argmax(1)] == ys)
    assert accuracy >= 0.95
    # the seed's misalignment: the same labels on the first len(rows) photos
    wrong = train_rank_head(x[: len(rows)], ys, "class", FAST)
    wrong_accuracy = np.mean(np.array(wrong.labels)[wrong.probabilities(xs).argmax(1)] == ys)
    assert wrong_accuracy < 0.6


def test_train_rank_heads_reports_what_it_left_out() -> None:
    rng = np.random.default_rng(1)
    x, species = photos(rng)
    heads = train_rank_heads(x, species, CATALOG, ranks=("kingdom", "class", "genus"),
                             settings=FAST)
    report = heads.extra["training"]
    assert report["class"]["left_out"] == 80 and report["class"]["rows"] == len(species) - 80
    assert report["genus"]["left_out"] == 0
    assert set(heads.heads) == {"kingdom", "class", "genus"}
    assert set(heads.heads["kingdom"].labels) == {"Animalia", "Chromista"}


def test_agreement_never_names_a_taxon_without_species_mass() -> None:
    q = agreed_distribution(np.array([0.7, 0.2, 0.1]), ("A", "B", "C"), {"B": 0.9, "C": 0.1})
    assert set(q) == {"B", "C"} and abs(sum(q.values()) - 1) < 1e-12
    assert q["B"] > q["C"]
    assert agreed_distribution(np.array([1.0]), ("A",), {"B": 1.0}) == {}


@pytest.fixture
def limpet_bundle(tmp_path: Path, loaded_demo_model):
    """Two near-identical limpet prototypes around a query: the species mass splits, the
    family Patellidae holds it; a crab and a wrack far away."""
    rng = np.random.default_rng(3)
    dim = loaded_demo_model.embedding_dim
    query = unit(rng.normal(size=dim))
    species = ["Patella vulgata", "Patella caerulea", "Carcinus maenas", "Fucus serratus"]
    protos = unit(rng.normal(size=(4, dim)))
    protos[:2] = unit(query + 0.02 * rng.normal(size=(2, dim)))
    path = write_bundle(tmp_path / "plain", loaded_demo_model, species, protos,
                        thresholds=Thresholds(prototype=0.9),
                        taxon_thresholds={"family": 0.8, "order": 0.8}, temperature=30.0)

    def with_family_head(limpet_label: str) -> Path:
        x = np.concatenate([unit(query + 0.05 * rng.normal(size=(30, dim))),
                            unit(protos[2] + 0.05 * rng.normal(size=(30, dim))),
                            unit(protos[3] + 0.05 * rng.normal(size=(30, dim)))])
        y = np.array([limpet_label] * 30 + ["Carcinidae"] * 30 + ["Fucaceae"] * 30, object)
        bundle = load_bundle(path)
        RankHeads({"family": train_rank_head(x, y, "family", FAST)}, "train").attach(bundle)
        return bundle.save(tmp_path / f"heads-{limpet_label}")

    return path, with_family_head, query


def test_a_rank_answer_needs_the_head_to_agree(limpet_bundle, make_server) -> None:
    plain, with_family_head, query = limpet_bundle
    request = pb.IdentifyRequest(embedding=query.tolist(), top_k=4)

    d = stub_for(make_server(bundle=plain)).Identify(request).decision
    assert (d.method, d.rank, d.taxon) == (pb.METHOD_TAXON, pb.RANK_FAMILY, "Patellidae")

    agreeing = stub_for(make_server(bundle=with_family_head("Patellidae"))).Identify(request)
    assert (agreeing.decision.rank, agreeing.decision.taxon) == (pb.RANK_FAMILY, "Patellidae")
    assert abs(agreeing.decision.confidence - d.confidence) < 1e-9  # the calibrated mass
    family = next(r for r in agreeing.rank_confidences if r.rank == pb.RANK_FAMILY)
    assert family.taxon == "Patellidae"

    # the family head says crab: no family answer; the order (no head there) still answers
    vetoed = stub_for(make_server(bundle=with_family_head("Carcinidae"))).Identify(request)
    assert vetoed.decision.method == pb.METHOD_TAXON
    assert (vetoed.decision.rank, vetoed.decision.taxon) == (pb.RANK_ORDER, "Patellogastropoda")
