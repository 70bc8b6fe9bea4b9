"""The bundle ``train`` writes: exact round trip, refusal when corrupt or mismatched,
reproducibility, and the numerical pieces (whitening, prototypes, split)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from training_data import longtail_features

from biolit_id.cli.main import main
from biolit_id.cli.training.datasets import (
    EmbeddingSet,
    fingerprint,
    read_embeddings,
    stratified_split,
    write_embeddings,
)
from biolit_id.cli.training.features import fit_whitening
from biolit_id.index.core.vectors import weighted_prototype
from biolit_id.server.decision.bundle import BundleError, load_bundle


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """30 catalog species (a few hundred rows) in 512-d: fast to train, still long-tailed."""
    root = tmp_path_factory.mktemp("small")
    data = longtail_features(seed=5, noise=0.3, common_range=(25, 40), rare_range=(6, 12))
    keep = sorted(set(data.species))[:30]
    rows = [i for i, s in enumerate(data.species) if s in keep]
    path = write_embeddings(root / "emb.parquet", data.subset(rows))
    return root, path


def _train(small_set, demo_model_spec, name: str, *extra: str):
    root, path = small_set
    out = root / name
    if not out.exists():
        assert main(["train", "--embeddings", str(path), "--model", demo_model_spec,
                     "--out", str(out), "--common", "10", "--epochs", "30", "--patience", "5",
                     "--no-progress", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def bundle_dir(small_set, demo_model_spec):
    return _train(small_set, demo_model_spec, "seed0")


def test_bundle_has_the_documented_layout(bundle_dir, loaded_demo_model):
    manifest = json.loads((bundle_dir / "manifest.json").read_text("utf-8"))
    for key in ("model_id", "model_fingerprint", "embedding_dim", "preprocessing", "species",
                "common", "rare", "thresholds", "temperature", "alpha", "whitening",
                "training_data_fingerprint", "metrics", "created_at", "tool_version", "split"):
        assert key in manifest, key
    assert manifest["model_fingerprint"] == loaded_demo_model.fingerprint
    assert manifest["whitening"] == {"input_dim": 512, "output_dim": 256}
    assert set(manifest["thresholds"]) >= {"classifier_high", "classifier_low", "prototype",
                                           "taxon"}
    bundle = load_bundle(bundle_dir)
    tensors = bundle.tensors()
    for key in ("visual_prototypes", "text_prototypes", "prototypes", "whitening_mu",
                "whitening_W", "head.0.weight", "head.1.weight", "head.4.weight",
                "head.7.weight"):
        assert key in tensors, key
    np.testing.assert_allclose(np.linalg.norm(bundle.prototypes, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(bundle.text_prototypes, axis=1), 1.0, atol=1e-5)
    assert bundle.temperature > 1.0
    assert not any(p.suffix in {".pt", ".pth", ".pkl"} for p in bundle_dir.rglob("*"))


def test_save_load_round_trip_is_exact(bundle_dir, tmp_path):
    first = load_bundle(bundle_dir)
    first.save(tmp_path / "copy")
    second = load_bundle(tmp_path / "copy")
    a, b = first.tensors(), second.tensors()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert first.manifest() == second.manifest()
    assert (bundle_dir / "weights.safetensors").read_bytes() == (
        tmp_path / "copy" / "weights.safetensors").read_bytes()
    assert second.bundle_id == first.bundle_id


def test_corrupted_weights_are_refused(bundle_dir, tmp_path):
    broken = tmp_path / "flipped"
    shutil.copytree(bundle_dir, broken)
    weights = broken / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its manifest"):
        load_bundle(broken)
    weights.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(broken)
    weights.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(broken)


def test_inconsistent_bundles_are_refused_at_load(bundle_dir, tmp_path):
    """What would fail on the first Identify must fail when the server starts."""
    good = load_bundle(bundle_dir)
    odd_head = load_bundle(bundle_dir)
    odd_head.common = [*odd_head.common[:-1], "Nessiteras rhombopteryx"]
    odd_head.save(tmp_path / "odd-head")
    with pytest.raises(BundleError, match="head classes missing"):
        load_bundle(tmp_path / "odd-head")
    narrow = load_bundle(bundle_dir)
    narrow.whitening_W = narrow.whitening_W[:, :-1]
    narrow.save(tmp_path / "narrow")
    with pytest.raises(BundleError, match="whitening maps"):
        load_bundle(tmp_path / "narrow")
    assert load_bundle(bundle_dir).common == good.common


def test_mismatched_model_or_dimension_is_refused(bundle_dir, make_server):
    with pytest.raises(BundleError, match="fingerprint"):
        load_bundle(bundle_dir, expect_fingerprint="0123456789abcdef")
    with pytest.raises(BundleError, match="768-d"):
        load_bundle(bundle_dir, expect_dim=768)
    # The service refuses it the same way at start-up.
    manifest_path = bundle_dir.parent / "other_model" / "manifest.json"
    shutil.copytree(bundle_dir, manifest_path.parent)
    manifest = json.loads(manifest_path.read_text("utf-8"))
    manifest["model_fingerprint"] = "0123456789abcdef"
    manifest_path.write_text(json.dumps(manifest), "utf-8")
    with pytest.raises(BundleError, match="retrain or re-import"):
        make_server(bundle=manifest_path.parent)


def test_embeddings_of_another_model_or_size_are_refused(bundle_dir, small_set, tmp_path,
                                                         demo_model_spec, caplog):
    data = read_embeddings(small_set[1])
    other = EmbeddingSet(data.species, data.embeddings, data.images,
                         {"model_id": "hf-hub:someone/else",
                          "model_fingerprint": "feedfeedfeedfeed"})
    write_embeddings(tmp_path / "other.parquet", other)
    assert main(["train", "--embeddings", str(tmp_path / "other.parquet"), "--model",
                 demo_model_spec, "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "feedfeedfeedfeed" in caplog.text and not (tmp_path / "b").exists()
    short = EmbeddingSet(data.species, data.embeddings[:, :384].copy(), data.images)
    write_embeddings(tmp_path / "short.parquet", short)
    assert main(["calibrate", "--bundle", str(bundle_dir), "--embeddings",
                 str(tmp_path / "short.parquet")]) == 2
    assert "384-d" in caplog.text


def test_same_seed_gives_identical_tensors(small_set, demo_model_spec, bundle_dir):
    again = load_bundle(_train(small_set, demo_model_spec, "seed0_again"))
    first = load_bundle(bundle_dir)
    a, b = first.tensors(), again.tensors()
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert first.temperature == again.temperature
    assert first.bundle_id == again.bundle_id
    other = load_bundle(_train(small_set, demo_model_spec, "seed1", "--seed", "1"))
    assert other.extra["split"]["test_fingerprint"] != first.extra["split"]["test_fingerprint"]
    assert not np.array_equal(other.head_state["7.weight"], first.head_state["7.weight"])


def test_whitening_keeps_the_rank_and_whitens():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 512)) @ rng.normal(size=(512, 512)) * 0.1
    mu, w, info = fit_whitening(x, 256)
    assert info["output_dim"] == 99 == info["rank"] and w.shape == (512, 99)  # n - 1 < 256
    white = (x - mu) @ w
    np.testing.assert_allclose(np.cov(white.T), np.eye(99), atol=1e-3)
    _, w_full, info_full = fit_whitening(rng.normal(size=(2000, 300)), 256)
    assert w_full.shape == (300, 256) and info_full["rank"] == 300


def test_weighted_prototype_resists_an_outlier():
    rng = np.random.default_rng(0)
    centre = np.zeros(64)
    centre[0] = 1.0
    cluster = centre + rng.normal(scale=0.05, size=(9, 64))
    outlier = np.zeros((1, 64))
    outlier[0, 1] = 1.0
    vectors = np.concatenate([cluster, outlier])
    plain = weighted_prototype(vectors, iterations=0)
    refined = weighted_prototype(vectors, iterations=2)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(plain, unit.mean(0) / np.linalg.norm(unit.mean(0)), atol=1e-6)
    assert refined @ centre > plain @ centre
    assert refined[1] < plain[1]  # the outlier's pull shrinks
    np.testing.assert_allclose(weighted_prototype(vectors[:1]), unit[0], atol=1e-6)


def test_stratified_split_is_seeded_disjoint_and_keeps_rare_species():
    species = ["a"] * 100 + ["b"] * 10 + ["c"] * 3 + ["d"] * 2 + ["e"]
    train, val, test = stratified_split(species, seed=7)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(species)))
    labels = np.array(species)
    assert len(test[labels[test] == "a"]) == 15 and len(val[labels[val] == "a"]) == 15
    for name in ("b", "c"):
        assert (labels[val] == name).sum() >= 1 and (labels[test] == name).sum() >= 1
    assert (labels[train] == "e").sum() == 1 and (labels[train] == "d").sum() == 1
    again = stratified_split(species, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip((train, val, test), again, strict=True))
    assert not np.array_equal(test, stratified_split(species, seed=8)[2])


def test_fingerprint_ignores_row_order_but_not_content():
    rng = np.random.default_rng(0)
    data = EmbeddingSet(["a", "b", "c"], rng.normal(size=(3, 8)).astype(np.float32),
                        ["1", "2", "3"])
    shuffled = data.subset([2, 0, 1])
    assert fingerprint(data) == fingerprint(shuffled)
    relabelled = EmbeddingSet(["a", "b", "b"], data.embeddings, data.images)
    assert fingerprint(relabelled) != fingerprint(data)
