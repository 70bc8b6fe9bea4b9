"""End to end on photos the test draws: embed -> train -> calibrate -> evaluate -> serve.

Twelve visually distinct classes (colour + pattern) with long-tailed counts,
named after catalog species, embedded by the random-init demo model through
the real ``embed`` command. The demo model knows nothing, but it maps
different colours to different vectors, which is all the pipeline needs to
show it learns, calibrates and reports.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from training_data import synthetic_photo, write_photo_set

from biolit_id.cli.evaluation.metrics import score_set
from biolit_id.cli.main import main
from biolit_id.cli.training.datasets import read_embeddings
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import load_bundle
from conftest import stub_for

COUNTS = [60, 50, 40, 34, 28, 22, 18, 14, 12, 10, 10, 10]
NAMES = [r.scientific_name for r in Catalog.load_default()][: len(COUNTS)]
TARGET = 0.88


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, demo_model_spec):
    root = tmp_path_factory.mktemp("e2e")
    manifest = write_photo_set(root / "data", NAMES, COUNTS, seed=3)
    emb, bundle, report = root / "emb.parquet", root / "bundle", root / "report"
    assert main(["embed", "--manifest", str(manifest), "--model", demo_model_spec,
                 "--out", str(emb), "--no-progress", "--batch-size", "64"]) == 0
    assert main(["train", "--embeddings", str(emb), "--model", demo_model_spec,
                 "--out", str(bundle), "--common", "6", "--no-progress"]) == 0
    assert main(["calibrate", "--bundle", str(bundle), "--coverage", str(TARGET)]) == 0
    assert main(["evaluate", "--bundle", str(bundle), "--out", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text("utf-8"))
    return {"root": root, "manifest": manifest, "emb": emb, "bundle": bundle,
            "report": report, "metrics": metrics}


def test_embed_writes_the_parquet_layout(pipeline, loaded_demo_model):
    data = read_embeddings(pipeline["emb"])
    assert len(data) == sum(COUNTS)
    assert data.counts() == dict(zip(NAMES, COUNTS, strict=True))
    assert data.embeddings.dtype == np.float32 and data.dim == loaded_demo_model.embedding_dim
    np.testing.assert_allclose(np.linalg.norm(data.embeddings, axis=1), 1.0, atol=1e-5)
    assert all(Path(p).is_file() for p in data.images)
    assert data.meta["model_fingerprint"] == loaded_demo_model.fingerprint
    import pyarrow.parquet as pq

    schema = pq.read_schema(pipeline["emb"])
    assert str(schema.field("species").type) == "string"
    assert str(schema.field("embedding").type) == "list<element: float>"
    assert str(schema.field("image").type) == "string"


def test_embed_resumes_from_cache_and_lists_unreadable_photos(pipeline, demo_model_spec,
                                                              capsys):
    root = pipeline["root"]
    bad = root / "data" / "photos" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = pipeline["manifest"].read_text("utf-8").splitlines()
    rows += ['photos/broken.jpg,"Actinia equina"', 'photos/missing.png,"Actinia equina"']
    manifest = root / "data" / "manifest_bad.csv"
    manifest.write_text("\n".join(rows) + "\n", "utf-8")
    out = root / "emb_again.parquet"
    # Same cache as the first run: nothing is embedded twice.
    cache = root / ".emb.parquet.cache"
    capsys.readouterr()
    assert main(["embed", "--manifest", str(manifest), "--model", demo_model_spec,
                 "--out", str(out), "--cache-dir", str(cache), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"0 embedded, {sum(COUNTS)} from cache, 2 unreadable" in printed
    first, again = read_embeddings(pipeline["emb"]), read_embeddings(out)
    np.testing.assert_array_equal(first.embeddings, again.embeddings)
    with (root / "emb_again.errors.csv").open() as f:
        errors = list(csv.DictReader(f))
    assert {Path(e["image"]).name for e in errors} == {"broken.jpg", "missing.png"}
    assert all(e["error"] for e in errors)


def test_embed_cache_keeps_runtimes_and_precisions_apart(pipeline, demo_model_spec, capsys):
    root = pipeline["root"]
    lines = pipeline["manifest"].read_text("utf-8").splitlines()
    manifest = root / "data" / "manifest_four.csv"
    manifest.write_text("\n".join(lines[:5]) + "\n", "utf-8")
    cache = root / ".emb.parquet.cache"  # the fp32 run's, which holds these four photos

    def embed(out: str, precision: str) -> str:
        capsys.readouterr()
        assert main(["embed", "--manifest", str(manifest), "--model", demo_model_spec,
                     "--out", str(root / out), "--cache-dir", str(cache),
                     "--precision", precision, "--no-progress"]) == 0
        return capsys.readouterr().out

    assert "4 embedded, 0 from cache" in embed("bf16.parquet", "bf16")
    assert "0 embedded, 4 from cache" in embed("bf16_again.parquet", "bf16")
    assert "0 embedded, 4 from cache" in embed("fp32.parquet", "fp32")
    bf16, fp32 = (read_embeddings(root / f).embeddings for f in ("bf16.parquet", "fp32.parquet"))
    assert not np.array_equal(bf16, fp32)  # what a shared cache would have mixed up
    np.testing.assert_array_equal(read_embeddings(root / "bf16_again.parquet").embeddings, bf16)


def test_embed_folder_mode_labels_by_subfolder(tmp_path, demo_model_spec):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["Patella vulgata", "Carcinus maenas"]):
        (tmp_path / "set" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "set" / name / f"{i}.png").write_bytes(synthetic_photo(c, rng))
    out = tmp_path / "folder.parquet"
    assert main(["embed", "--folder", str(tmp_path / "set"), "--model", demo_model_spec,
                 "--out", str(out), "--no-progress"]) == 0
    data = read_embeddings(out)
    assert data.counts() == {"Carcinus maenas": 3, "Patella vulgata": 3}
    assert not (tmp_path / "folder.errors.csv").exists()


def test_train_records_the_held_out_split(pipeline):
    bundle = load_bundle(pipeline["bundle"])
    split = bundle.extra["split"]
    parts = {n: read_embeddings(pipeline["bundle"] / split["files"][n])
             for n in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == sum(COUNTS)
    images = {n: set(p.images) for n, p in parts.items()}
    assert not images["train"] & images["test"] and not images["val"] & images["test"]
    assert split["counts"]["test"] == len(parts["test"]) == len(split["test_rows"])
    assert all(parts["test"].counts().get(n, 0) >= 1 for n in NAMES)  # rare ones too
    # The calibration fold comes out of train + val and is fitted on by nothing but the cuts:
    # the components' counts leave it (and the head's early-stopping rows) out.
    calibration = read_embeddings(pipeline["bundle"] / split["calibration"]["file"])
    assert set(calibration.images) <= images["train"] | images["val"]
    assert not set(calibration.images) & images["test"]
    assert len(calibration) == split["calibration"]["rows"] > 0
    fitted = sum(bundle.extra["train_counts"].values())
    assert fitted < len(parts["train"]) + len(parts["val"]) - len(calibration)
    # The 6 most frequent are the report's "common" group; the fused head covers every
    # species with enough photos (all twelve have at least 5 training photos).
    assert bundle.routing == "fused"
    assert bundle.extra["groups"]["common"] == sorted(NAMES[:6])
    assert bundle.common == sorted(NAMES)
    assert bundle.prototypes.shape[0] == len(NAMES)
    assert bundle.whitening_W.shape[1] == bundle.extra["training"]["whitening"]["output_dim"]


def test_end_to_end_accuracy_well_above_chance_and_coverage_near_target(pipeline):
    m = pipeline["metrics"]
    chance = 1 / len(NAMES)
    assert m["accuracy_global"] > 0.75 > 5 * chance
    assert m["accuracy_all"] > 0.6
    # Common and rare accuracy are over the answered photos of each group, which together
    # are all the answered photos (every test species is known): recomputed per species.
    assert m["unknown_species_samples"] == 0
    common = set(NAMES[:6])
    assert {r["species"] for r in m["per_species"]} == set(NAMES)
    assert {r["species"] for r in m["per_species"] if r["common"]} == common
    answered = {True: 0.0, False: 0.0}
    right = {True: 0.0, False: 0.0}
    for r in m["per_species"]:
        answered[r["common"]] += r["coverage"] * r["test_count"]
        right[r["common"]] += r["accuracy_all"] * r["test_count"]
    assert m["accuracy_common"] == pytest.approx(right[True] / answered[True])
    assert m["accuracy_rare"] == pytest.approx(right[False] / answered[False])
    assert m["accuracy_global"] == pytest.approx(
        (right[True] + right[False]) / (answered[True] + answered[False]))
    assert m["coverage"] == pytest.approx(
        (answered[True] + answered[False]) / m["samples"])
    assert m["accuracy_common"] > 0.75 and m["accuracy_rare"] > 0.75  # the rare are learnt too
    assert abs(m["coverage"] - TARGET) <= 0.12
    assert m["test_is_bundle_split"] is True
    counts = m["per_method"]
    assert sum(v["count"] for v in counts.values()) == m["samples"]
    bundle = load_bundle(pipeline["bundle"])
    calibration = bundle.metrics["calibration"]
    assert calibration["routing"]["coverage"] >= TARGET  # the target holds where it was fitted
    assert "temperature" not in calibration  # weights chosen out of fold are not refitted
    assert set(calibration["routing"]["groups"]) == {"common", "rare", "runtime"}
    families = bundle.extra["decision_families"]
    served = [r for r in families["table"] if r["served"] and not r["family"].startswith(
        "cosine (")]
    chosen = next(r for r in served if r["family"] == families["chosen"])
    assert chosen["balanced_accuracy"] == max(r["balanced_accuracy"] for r in served)
    assert bundle.fusion["family"] == families["chosen"]


def test_report_has_readable_plots(pipeline):
    report = pipeline["report"]
    html = (report / "report.html").read_text("utf-8")
    for name in ("risk_coverage.png", "reliability.png", "per_species.png", "confusions.png"):
        with Image.open(report / name) as img:
            assert img.format == "PNG" and img.width >= 500 and img.height >= 300
        assert f'src="{name}"' in html
    for key in ("accuracy_common", "accuracy_rare", "accuracy_global", "accuracy_all",
                "coverage", "ece", "per_method", "taxon_fallback_rate",
                "taxon_fallback_accuracy"):
        assert key in pipeline["metrics"]


def test_served_bundle_answers_like_evaluate(pipeline, make_server):
    """The service, fed the test photos, decides exactly as evaluate scored them."""
    bundle = load_bundle(pipeline["bundle"])
    test = read_embeddings(pipeline["bundle"] / "split" / "test.parquet")
    scored = score_set(bundle, test.embeddings, test.species)
    stub = stub_for(make_server(bundle=pipeline["bundle"]))
    for i in range(0, len(test), max(1, len(test) // 8)):
        resp = stub.Identify(pb.IdentifyRequest(image=Path(test.images[i]).read_bytes()))
        method = int(scored.routed.method[i])
        if resp.decision.method == pb.METHOD_TAXON:  # a rejection answered at a higher rank
            assert method == pb.METHOD_REJECTED
        else:
            assert int(resp.decision.method) == method
        expected = scored.names[scored.routed.species[i]] if scored.routed.species[i] >= 0 else ""
        assert resp.decision.species == expected
        assert resp.versions.bundle_id == bundle.bundle_id


def test_evaluate_refuses_the_training_data(pipeline, tmp_path, caplog):
    train = pipeline["bundle"] / "split" / "train.parquet"
    shutil.copy(train, tmp_path / "train.parquet")
    rc = main(["evaluate", "--bundle", str(pipeline["bundle"]), "--embeddings",
               str(tmp_path / "train.parquet"), "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "training data" in caplog.text
