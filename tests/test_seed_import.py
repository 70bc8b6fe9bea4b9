"""``biolit-id import-seed``: safe loading, exact copy of the seed, round trip."""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from biolit_id.cli.import_seed import SeedImportError, summary_lines
from biolit_id.cli.main import main as cli
from biolit_id.cli.seedcompat.import_v4 import (
    GENERIC_PROMPT,
    import_seed,
    load_seed_file,
    seed_safe_globals,
)
from biolit_id.index.core.vectors import fuse_prototypes
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import load_bundle
from conftest import SEED_DIR

CLASSIFIER = SEED_DIR / "best_model_top50.pth"
PROTOTYPES = SEED_DIR / "prototypes_v4.pt"


def _whiten(x: np.ndarray, mu: np.ndarray, w: np.ndarray) -> np.ndarray:
    y = (x - mu) @ w
    return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def raw_seed() -> tuple[dict, dict]:
    return load_seed_file(CLASSIFIER), load_seed_file(PROTOTYPES)


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory: pytest.TempPathFactory, demo_model_spec: str) -> Path:
    out = tmp_path_factory.mktemp("imported") / "bundle"
    code = cli(["import-seed", "--classifier", str(CLASSIFIER), "--prototypes", str(PROTOTYPES),
                "--model", demo_model_spec, "--out", str(out)])
    assert code == 0
    return out


# ------------------------------------------------------------------ safe loading


class _Exploit:
    """Unpickling this runs a shell command: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torch_file_that_runs_a_command_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"prototypes": torch.zeros(2, 2), "hook": _Exploit(marker)}, evil)
    with pytest.raises(SeedImportError, match=r"refused.*GLOBAL \w+\.system"):
        load_seed_file(evil)
    assert not marker.exists()


def test_plain_pickle_that_runs_a_command_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"classifier_state_dict": _Exploit(marker)}, protocol=2))
    with pytest.raises(SeedImportError):
        load_seed_file(evil)
    assert not marker.exists()


def test_numpy_globals_beyond_the_list_are_refused(tmp_path: Path) -> None:
    # A numpy scalar pickles through numpy's `scalar` global, which the seed never needs.
    path = tmp_path / "scalar.pt"
    torch.save({"temperature": np.float64(23.8)}, path)
    with pytest.raises(SeedImportError, match=r"refused.*multiarray\.scalar"):
        load_seed_file(path)


def test_every_allow_listed_global_is_needed() -> None:
    """The list is exact: the seed file loads with it and not without any one entry."""
    assert isinstance(load_seed_file(PROTOTYPES)["whitening_W"], np.ndarray)
    full = seed_safe_globals()
    for i in range(len(full)):
        with torch.serialization.safe_globals(full[:i] + full[i + 1 :]), \
                pytest.raises(pickle.UnpicklingError):
            torch.load(PROTOTYPES, weights_only=True, map_location="cpu")


# ------------------------------------------------------------------ the import


def test_import_keeps_the_seed_exactly(cli_bundle: Path, raw_seed, loaded_demo_model) -> None:
    clf, protos = raw_seed
    bundle = load_bundle(cli_bundle, loaded_demo_model.fingerprint, 512)

    assert bundle.common == [clf["idx_to_species"][i] for i in range(50)]
    assert bundle.species == [protos["idx_to_species"][i] for i in range(100)]
    # names exactly as the seed spells them
    for name in ("Littorina fabalis/obtusata", "Magallana gigas / Ostrea edulis", "Patella sp."):
        assert name in bundle.species
    state = clf["classifier_state_dict"]
    assert sorted(bundle.head_state) == sorted(k[len("net."):] for k in state)
    for key, value in state.items():
        np.testing.assert_array_equal(bundle.head_state[key[len("net."):]], value.numpy())
    np.testing.assert_array_equal(bundle.visual_prototypes, protos["prototypes"].numpy())
    np.testing.assert_array_equal(bundle.whitening_mu, protos["whitening_mu"])
    np.testing.assert_array_equal(bundle.whitening_W, protos["whitening_W"])
    assert bundle.temperature == protos["temperature"]
    assert bundle.alpha == protos["alpha"]
    assert bundle.thresholds.classifier_high == protos["seuil_top50"] == 0.8
    assert bundle.thresholds.prototype == bundle.thresholds.classifier_low == protos["seuil_proto"]
    assert bundle.model_fingerprint == loaded_demo_model.fingerprint

    # text prototypes: the catalog's prompts through the model's text tower, whitened
    catalog = Catalog.load_default()
    raw_text = loaded_demo_model.encode_text([catalog.get(n).prompt() for n in bundle.species])
    text = _whiten(raw_text, protos["whitening_mu"], protos["whitening_W"])
    np.testing.assert_allclose(bundle.text_prototypes, text, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(bundle.text_prototypes, axis=1), 1.0, atol=1e-5)
    fused = fuse_prototypes(protos["prototypes"].numpy(), text, protos["alpha"])
    np.testing.assert_allclose(bundle.prototypes, fused, atol=1e-5)

    source = bundle.extra["source"]
    for key, path in (("classifier", CLASSIFIER), ("prototypes", PROTOTYPES)):
        assert source[key]["file"] == path.name
        assert source[key]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["classifier"]["val_acc"] == clf["val_acc"]
    assert bundle.extra["catalog_missing"] == []
    assert bundle.extra["prompts"]["by_species"] == {"file": 0, "catalog": 100, "generic": 0}


def test_bundle_round_trip(tmp_path: Path, loaded_demo_model, demo_model_spec: str) -> None:
    made = import_seed(CLASSIFIER, PROTOTYPES, demo_model_spec, model=loaded_demo_model)
    made.save(tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.bundle_id == made.bundle_id
    for name in ("model_id", "model_fingerprint", "embedding_dim", "species", "common",
                 "head_config", "temperature", "alpha", "thresholds", "preprocessing", "extra"):
        assert getattr(loaded, name) == getattr(made, name), name
    assert made.tensors().keys() == loaded.tensors().keys()
    for key, value in made.tensors().items():
        np.testing.assert_array_equal(loaded.tensors()[key], value, err_msg=key)
    assert loaded.manifest() | {"created_at": ""} == made.manifest() | {"created_at": ""}


def test_prompts_file_replaces_catalog_prompts(tmp_path: Path, loaded_demo_model,
                                              demo_model_spec: str, raw_seed) -> None:
    _, protos = raw_seed
    custom = {"Patella sp.": "a photo of a limpet on a rock",
              "Velella velella": "a photo of a by-the-wind sailor stranded on a beach"}
    path = tmp_path / "prompts.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["species", "prompt"])
        writer.writerows(custom.items())
    bundle = import_seed(CLASSIFIER, PROTOTYPES, demo_model_spec, prompts_csv=path,
                         model=loaded_demo_model)
    catalog = Catalog.load_default()
    rows = sorted({bundle.species.index(n) for n in custom} | set(range(0, 100, 25)))
    prompts = [custom.get(bundle.species[r]) or catalog.get(bundle.species[r]).prompt()
               for r in rows]
    expected = _whiten(loaded_demo_model.encode_text(prompts), protos["whitening_mu"],
                       protos["whitening_W"])
    np.testing.assert_allclose(bundle.text_prototypes[rows], expected, atol=1e-5)
    assert bundle.extra["prompts"]["by_species"] == {"file": 2, "catalog": 98, "generic": 0}


def test_prompts_file_naming_an_unknown_species_fails(tmp_path: Path, demo_model_spec: str,
                                                     capsys) -> None:
    path = tmp_path / "prompts.csv"
    path.write_text("species,prompt\nPatella vulgaa,a photo of a limpet\n", "utf-8")
    code = cli(["import-seed", "--classifier", str(CLASSIFIER), "--prototypes", str(PROTOTYPES),
                "--model", demo_model_spec, "--out", str(tmp_path / "b"), "--prompts", str(path)])
    assert code == 1
    assert "Patella vulgaa" in capsys.readouterr().out
    assert not (tmp_path / "b").exists()


def test_names_missing_from_the_catalog_are_kept_and_reported(loaded_demo_model,
                                                              demo_model_spec: str) -> None:
    dropped = {"Patella sp.", "Littorina fabalis/obtusata", "Magallana gigas / Ostrea edulis"}
    full = Catalog.load_default()
    catalog = Catalog([r for r in full if r.scientific_name not in dropped], full.version)
    bundle = import_seed(CLASSIFIER, PROTOTYPES, demo_model_spec, catalog=catalog,
                         model=loaded_demo_model)
    assert len(bundle.species) == 100
    assert set(bundle.extra["catalog_missing"]) == dropped
    assert set(bundle.extra["prompts"]["generic"]) == dropped
    printed = "\n".join(summary_lines(bundle))
    for name in dropped:
        assert name in printed
    # their text prototype is the seed's generic fallback prompt, not nothing
    row = bundle.species.index("Patella sp.")
    raw = loaded_demo_model.encode_text([GENERIC_PROMPT.format(name="Patella sp.")])
    np.testing.assert_allclose(bundle.text_prototypes[row], bundle.whiten(raw)[0], atol=1e-5)


def _rewritten_classifier(tmp_path: Path, raw: dict, **changes) -> Path:
    data = {**raw, **changes}
    path = tmp_path / "classifier.pth"
    torch.save(data, path)
    return path


def test_classifier_species_without_prototype_is_an_error(tmp_path: Path, raw_seed,
                                                          demo_model_spec: str, capsys) -> None:
    clf, _ = raw_seed
    renamed = dict(clf["idx_to_species"])
    renamed[3] = "Homarus gammarus"
    path = _rewritten_classifier(tmp_path, clf, idx_to_species=renamed)
    code = cli(["import-seed", "--classifier", str(path), "--prototypes", str(PROTOTYPES),
                "--model", demo_model_spec, "--out", str(tmp_path / "b")])
    assert code == 1
    out = capsys.readouterr().out
    assert "Homarus gammarus" in out and "no prototype" in out


def test_head_that_does_not_fit_the_architecture_is_an_error(tmp_path: Path, raw_seed) -> None:
    clf, _ = raw_seed
    state = dict(clf["classifier_state_dict"])
    del state["net.4.bias"]
    path = _rewritten_classifier(tmp_path, clf, classifier_state_dict=state)
    with pytest.raises(SeedImportError, match="does not fit"):
        import_seed(path, PROTOTYPES, "local-dir:/nonexistent")


def test_model_with_another_embedding_dim_is_refused(tmp_path: Path) -> None:
    import json

    import open_clip

    from biolit_id.cli.demo_model import TINY_CONFIG
    from biolit_id.server.inference.model_loader import load_model

    cfg = {**TINY_CONFIG, "embed_dim": 256}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}), "utf-8")
    torch.save(open_clip.CLIP(**cfg).state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    narrow = load_model(f"local-dir:{tmp_path}")
    assert narrow.embedding_dim == 256
    with pytest.raises(SeedImportError, match="512-d"):
        import_seed(CLASSIFIER, PROTOTYPES, narrow.spec, model=narrow)
