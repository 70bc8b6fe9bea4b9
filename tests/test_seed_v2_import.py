"""``import-seed --v2``: the three files read safely, the bundle an exact copy of the seed."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from biolit_id.cli.main import main as cli
from biolit_id.cli.seedcompat.formats import SeedImportError
from biolit_id.cli.seedcompat.import_v2 import (
    LabelEncoderStub,
    check_data_pickle,
    classifier_safe_globals,
    import_seed_v2,
    load_classifier,
    proper_name,
    read_prototypes,
    read_tax_lookup,
)
from biolit_id.server.decision.bundle import load_bundle
from biolit_id.server.decision.rank_heads import RankHeads
from biolit_id.server.decision.seed_v2 import SeedV2Settings
from conftest import SEED_V2_DIR

PROTOS = SEED_V2_DIR / "proto_model.npz"
MLP = SEED_V2_DIR / "mlp_model.pt"
TAX = SEED_V2_DIR / "tax_lookup.pkl"
LEVELS = {"regne": "kingdom", "phylum": "phylum", "classe": "class", "ordre": "order",
          "famille": "family"}


class FakeModel:
    """Only what the importer reads of a model: its id, fingerprint and width."""

    def __init__(self, dim: int = 768) -> None:
        self.spec, self.fingerprint, self.embedding_dim = "local-dir:/models/x", "f" * 16, dim


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def bundle():
    return import_seed_v2(PROTOS, MLP, TAX, "unused", model=FakeModel())


# ------------------------------------------------------------------ safe loading


def test_classifier_loads_with_exactly_its_allow_list() -> None:
    data = load_classifier(MLP)
    assert list(data) == list(LEVELS)
    assert isinstance(data["famille"]["encoder"], LabelEncoderStub)
    full = classifier_safe_globals()
    for i in range(len(full)):  # every entry is needed
        with torch.serialization.safe_globals(full[:i] + full[i + 1:]), \
                pytest.raises(pickle.UnpicklingError):
            torch.load(MLP, weights_only=True, map_location="cpu")


def test_classifier_that_runs_a_command_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "mlp_model.pt"
    torch.save({"regne": {"state_dict": {}, "encoder": _Exploit(marker)}}, evil)
    with pytest.raises(SeedImportError, match=r"refused.*system"):
        load_classifier(evil)
    assert not marker.exists()


def test_label_encoder_stub_keeps_only_string_classes() -> None:
    stub = LabelEncoderStub()
    with pytest.raises(pickle.UnpicklingError):
        stub.__setstate__({"classes_": np.array([1, 2])})
    with pytest.raises(pickle.UnpicklingError):
        stub.__setstate__({"_sklearn_version": "1.8.0"})
    stub.__setstate__({"classes_": np.array(["Animalia"], dtype=object), "x": 1})
    assert list(stub.classes_) == ["Animalia"] and not hasattr(stub, "x")


def test_taxonomy_pickle_with_a_global_is_refused_before_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "tax_lookup.pkl"
    evil.write_bytes(pickle.dumps({"patella vulgata": {"regne": _Exploit(marker)}}, protocol=4))
    with pytest.raises(SeedImportError, match=r"opcode STACK_GLOBAL"):
        read_tax_lookup(evil)
    assert not marker.exists()
    for protocol in (0, 2):  # GLOBAL and REDUCE in older protocols
        with pytest.raises(SeedImportError, match=r"opcode (GLOBAL|REDUCE)"):
            check_data_pickle(pickle.dumps(_Exploit(marker), protocol=protocol), "x")
    with pytest.raises(SeedImportError, match="not a readable pickle"):
        check_data_pickle(b"\x80\x04\x95garbage", "x")


def test_taxonomy_is_read_as_plain_data() -> None:
    tax = read_tax_lookup(TAX)
    raw_keys = list(pickle.load(io.BytesIO(TAX.read_bytes())))  # the real file is plain data
    assert list(tax) == raw_keys and len(tax) == 215
    missing = {lvl: sorted(n for n, t in tax.items() if lvl not in t) for lvl in LEVELS}
    assert len(missing["phylum"]) == 12 and len(missing["classe"]) == 3
    assert len(missing["ordre"]) == 5 and not missing["regne"] and not missing["famille"]
    assert "caretta caretta" in missing["classe"] and "patella vulgata" in missing["ordre"]


def test_prototype_file_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    data = dict(np.load(PROTOS, allow_pickle=False))
    data["species_list"] = np.array(list(data["species_list"]), dtype=object)
    np.savez(tmp_path / "p.npz", **data)
    with pytest.raises(SeedImportError, match="refused"):
        read_prototypes(tmp_path / "p.npz")
    data = dict(np.load(PROTOS, allow_pickle=False))
    data["wh_components"] = data["wh_components"][:, :512]
    np.savez(tmp_path / "q.npz", **data)
    with pytest.raises(SeedImportError, match="shapes do not fit"):
        read_prototypes(tmp_path / "q.npz")


# ------------------------------------------------------------------ the bundle


def test_names_get_their_proper_form() -> None:
    assert proper_name("lepas (anatifa) anatifera") == "Lepas (Anatifa) anatifera"
    assert proper_name("codium fragile subsp. fragile") == "Codium fragile subsp. fragile"
    assert proper_name("echinaster (echinaster) sepositus") == "Echinaster (Echinaster) sepositus"
    assert proper_name("patella vulgata") == "Patella vulgata"


def test_bundle_is_the_seed_exactly(bundle) -> None:
    seed = np.load(PROTOS, allow_pickle=False)
    seed_names = [str(s) for s in seed["species_list"]]
    assert [n.lower() for n in bundle.species] == seed_names
    assert bundle.routing == "seed-v2" and bundle.embedding_dim == 768
    assert bundle.common == [] and bundle.prototype_dim == 256
    np.testing.assert_array_equal(bundle.prototypes, seed["prototypes"])
    assert bundle.temperature == float(seed["temperature"][0])
    settings = SeedV2Settings.from_bundle(bundle)
    assert (settings.threshold, settings.margin) == (0.5, 0.10)
    assert all(settings.seed_name(n) == n.lower() for n in bundle.species)
    # the folded whitening is the seed's centre / project / divide / normalise
    with np.load(SEED_V2_DIR / "bioclip_features.npz", allow_pickle=False) as f:
        x = f["features"]
    z = (x - seed["wh_mean"]) @ seed["wh_components"].T / np.sqrt(seed["wh_variance"] + 1e-8)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(bundle.whiten(x), z, atol=1e-6)


def test_rank_heads_are_the_seeds(bundle) -> None:
    heads = RankHeads.from_bundle(bundle)
    raw = load_classifier(MLP)
    tax = read_tax_lookup(TAX)
    assert heads.source == "seed-v2" and heads.ranks == tuple(
        r for r in ("kingdom", "phylum", "class", "order", "family"))
    for level, rank in LEVELS.items():
        head = heads.heads[rank]
        assert list(head.labels) == list(raw[level]["encoder"].classes_)
        assert set(head.labels) == {t[level] for t in tax.values() if level in t}
        for key, value in raw[level]["state_dict"].items():
            if not key.endswith("num_batches_tracked"):
                np.testing.assert_array_equal(head.state[key[len("net."):]], value.numpy())
    assert bundle.extra["label_gaps"] == {}
    assert [len(heads.heads[r].labels) for r in heads.ranks] == [3, 14, 26, 88, 150]
    # the seed's own forward pass (torch, eval mode) gives the same probabilities
    net = torch.nn.Sequential(torch.nn.Linear(256, 1200), torch.nn.BatchNorm1d(1200),
                              torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(1200, 150))
    net.load_state_dict({k[len("net."):]: v for k, v in raw["famille"]["state_dict"].items()})
    net.eval()
    fw = bundle.whiten(np.load(SEED_V2_DIR / "bioclip_features.npz")["features"])
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(fw)), dim=1).numpy()
    np.testing.assert_allclose(heads.heads["family"].probabilities(fw), want, atol=1e-5)


def test_saved_bundle_round_trips_without_pickle(bundle, tmp_path: Path) -> None:
    bundle.save(tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.routing == "seed-v2" and loaded.species == bundle.species
    for key, value in bundle.tensors().items():
        np.testing.assert_array_equal(loaded.tensors()[key], value, err_msg=key)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text("utf-8"))
    assert manifest["routing"] == "seed-v2"
    assert manifest["seed_v2"]["taxonomy"]["Patella vulgata"] == {
        "kingdom": "Animalia", "phylum": "Mollusca", "class": "Gastropoda", "family": "Patellidae"}
    assert manifest["source"]["taxonomy"]["file"] == "tax_lookup.pkl"
    assert RankHeads.from_bundle(loaded).heads["order"].labels[87] == "[unassigned] Caenogastropoda"


def test_cli_refuses_what_does_not_fit(tmp_path: Path, demo_model_spec: str, capsys) -> None:
    base = ["import-seed", "--prototypes", str(PROTOS), "--classifier", str(MLP),
            "--model", demo_model_spec, "--out", str(tmp_path / "b")]
    assert cli([*base, "--v2"]) == 1
    assert "--taxonomy" in capsys.readouterr().out
    assert cli([*base, "--v2", "--taxonomy", str(TAX), "--threshold", "1.5"]) == 1
    assert "[0, 1]" in capsys.readouterr().out
    assert cli([*base, "--taxonomy", str(TAX)]) == 1  # v4 import with a v2 flag
    assert "--v2 only" in capsys.readouterr().out
    assert not (tmp_path / "b").exists()
    with pytest.raises(SeedImportError, match="768-d"):
        import_seed_v2(PROTOS, MLP, TAX, "unused", model=FakeModel(512))
