"""``evaluate --real-crops``: the v2 bundle on the 79 real crops, labels from their file names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from biolit_id.cli.evaluation.real_crops import LabelMap, crops_of, evaluate_real_crops, normalise
from biolit_id.cli.main import main as cli
from biolit_id.cli.seedcompat.formats import read_feature_cache
from biolit_id.cli.seedcompat.import_v2 import import_seed_v2
from biolit_id.server.catalog.catalog import Catalog
from conftest import SEED_V2_DIR

FEATURES = SEED_V2_DIR / "bioclip_features.npz"


class FakeModel:
    spec, fingerprint, embedding_dim = "local-dir:/models/bioclip-2", "0" * 16, 768


@pytest.fixture(scope="module")
def v2_bundle(tmp_path_factory) -> Path:
    bundle = import_seed_v2(SEED_V2_DIR / "proto_model.npz", SEED_V2_DIR / "mlp_model.pt",
                            SEED_V2_DIR / "tax_lookup.pkl", "unused", model=FakeModel())
    return bundle.save(tmp_path_factory.mktemp("v2"))


def test_vernacular_names_map_only_when_unambiguous() -> None:
    labels = LabelMap.from_catalog(Catalog.load_default())
    assert normalise("Pourpre_petite_pierre") == normalise("Pourpre petite-pierre")
    assert labels.species_for("Tomate_de_mer_de_l'Atlantique") == ("Actinia equina", "name")
    assert labels.species_for("Ponte de nasse réticulée") == ("Tritia reticulata", "remains")
    assert labels.species_for("Os de seiche") == ("Sepia officinalis", "remains")
    assert labels.species_for("Griffe de sorcière") == ("", "ambiguous")  # two Carpobrotus
    assert labels.species_for("Crabe de pierre") == ("", "unknown")


def test_real_crops_report(v2_bundle: Path) -> None:
    report = evaluate_real_crops(v2_bundle, FEATURES)
    assert (report["crops"], report["photos"]) == (79, 46)
    assert report["mapped"] == 70 and report["mapped_by"] == {"name": 61, "remains": 9}
    assert report["unmapped"] == {"Crabe de pierre": 5, "Grande claveline": 3,
                                  "Porcellane grise": 1}
    # independently of the service: the seed's own species answers for the mapped crops
    images, _ = read_feature_cache(FEATURES)
    crops = {c.image: c for c in crops_of(images, LabelMap.from_catalog(Catalog.load_default()))}
    with open(SEED_V2_DIR / "predictions.csv", newline="", encoding="utf-8") as f:
        seed = [r for r in csv.DictReader(f) if r["image"] in crops and crops[r["image"]].species]
    species_rows = [r for r in seed if r["best_level"] == "species_name"]
    right = sum(r["best_label"] == crops[r["image"]].species.lower() for r in species_rows)
    assert report["per_rank"]["species"] == {"answers": len(species_rows), "right": right}
    top1 = sum(r["top1_espece"] == crops[r["image"]].species.lower() for r in seed)
    assert report["prototype_top1"]["count"] == top1
    assert "not a benchmark" in report["caveat"]


def test_cli(v2_bundle: Path, tmp_path: Path, capsys) -> None:
    assert cli(["evaluate", "--bundle", str(v2_bundle), "--real-crops", str(FEATURES),
                "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "79 crops of 46 photos" in printed and "not a benchmark" in printed
    assert json.loads((tmp_path / "real_crops.json").read_text("utf-8"))["mapped"] == 70
