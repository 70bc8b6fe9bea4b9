"""The seed's second generation, imported and served: its own output on 79 real crops.

``../shared/seed-v2/bioclip_features.npz`` holds 79 real BioCLIP-2 embeddings of
field-photo crops and ``predictions.csv`` what the seed answered for them
(thresholds 0.5 / 0.10). The bundle from ``import-seed --v2`` is served on a
random-weight ViT-L-14 (BioCLIP-2's architecture, 768-d): the embeddings go in
over gRPC and every column of the seed's file must come back, 79/79. The
expected values are the seed's file itself, never recomputed here.
"""

from __future__ import annotations

import csv
from pathlib import Path

import grpc
import numpy as np
import pytest

from biolit_id.cli.main import main as cli
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.decision.bundle import BundleError, load_bundle
from conftest import SEED_DIR, SEED_V2_DIR, stub_for

FEATURES = SEED_V2_DIR / "bioclip_features.npz"
COLUMNS = ("best_level", "best_label", "best_score", "margin", "path", "top1_espece",
           "conf_espece", "top2_espece")
PB_LEVEL = {pb.RANK_SPECIES: "species_name", pb.RANK_FAMILY: "famille", pb.RANK_ORDER: "ordre",
            pb.RANK_CLASS: "classe", pb.RANK_PHYLUM: "phylum", pb.RANK_KINGDOM: "regne"}


def seed_files(*extra: str) -> list[str]:
    return ["--v2", "--prototypes", str(SEED_V2_DIR / "proto_model.npz"),
            "--classifier", str(SEED_V2_DIR / "mlp_model.pt"),
            "--taxonomy", str(SEED_V2_DIR / "tax_lookup.pkl"), *extra]


def crops() -> tuple[list[str], np.ndarray]:
    with np.load(FEATURES, allow_pickle=False) as npz:
        names = [p.replace("\\", "/").rsplit("/", 1)[-1] for p in npz["image_paths"]]
        return names, np.asarray(npz["features"], dtype=np.float32)


def seed_rows() -> dict[str, dict[str, str]]:
    with open(SEED_V2_DIR / "predictions.csv", newline="", encoding="utf-8") as f:
        return {row["image"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def vit_l14_spec(vit_l14_model_dir: Path) -> str:
    return f"local-dir:{vit_l14_model_dir}"


@pytest.fixture(scope="module")
def v2_bundle(tmp_path_factory: pytest.TempPathFactory, vit_l14_spec: str) -> Path:
    out = tmp_path_factory.mktemp("seed-v2") / "bundle"
    assert cli(["import-seed", *seed_files(), "--model", vit_l14_spec, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def v2_server(v2_bundle: Path, vit_l14_spec: str, tmp_path_factory):
    from biolit_id.server.app import start_server
    from biolit_id.server.config import ServerConfig

    config = ServerConfig(model=vit_l14_spec, bundle=v2_bundle, port=0, grace_seconds=1.0,
                          data_dir=tmp_path_factory.mktemp("v2-data"))
    running = start_server(config)
    yield running
    running.stop(0.5)


def as_seed_columns(resp: pb.IdentifyResponse) -> dict[str, str]:
    """A response in the seed's words: its levels, its lower-case species names."""
    d = resp.decision
    protos = resp.prototype_candidates
    if d.method == pb.METHOD_REJECTED:
        level, label, score = "rejeté", "—", 0.0
    else:
        level, label, score = PB_LEVEL[d.rank], d.species.lower() or d.taxon, d.confidence
    return {
        "best_level": level,
        "best_label": label,
        "best_score": f"{score:.0%}",
        "margin": f"{round(protos[0].score - protos[1].score, 4):.3f}",
        "path": "proto_clip" if d.rank == pb.RANK_SPECIES else "mlp",
        "top1_espece": protos[0].species.lower(),
        "conf_espece": f"{round(protos[0].score, 4):.0%}",
        "top2_espece": protos[1].species.lower(),
    }


def test_served_bundle_reproduces_the_seed_on_79_real_crops(v2_server) -> None:
    names, features = crops()
    expected = seed_rows()
    assert len(names) == 79 and len(expected) == 236 and set(names) <= set(expected)
    stub = stub_for(v2_server)
    info = stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert info.embedding_dim == 768 and info.mode == "seed-v2"

    requests = (pb.IdentifyRequest(embedding=f.tolist(), top_k=3, request_id=n)
                for n, f in zip(names, features, strict=True))
    responses = list(stub.IdentifyStream(requests, timeout=120))
    assert [r.request_id for r in responses] == names
    differing = []
    for name, resp in zip(names, responses, strict=True):
        assert not resp.HasField("error"), resp.error.message
        got = as_seed_columns(resp)
        want = {c: expected[name][c] for c in COLUMNS}
        if got != want:
            differing.append((name, {c: (want[c], got[c]) for c in COLUMNS if got[c] != want[c]}))
    assert not differing, f"{len(differing)}/79 differ: {differing[:3]}"
    levels = {as_seed_columns(r)["best_level"] for r in responses}
    assert {"species_name", "famille", "classe"} <= levels  # both paths are exercised


def test_decisions_map_onto_the_contract(v2_server) -> None:
    names, features = crops()
    expected = seed_rows()
    stub = stub_for(v2_server)
    seen = set()
    for name, f in zip(names, features, strict=True):
        resp = stub.Identify(pb.IdentifyRequest(embedding=f.tolist()))
        d, row = resp.decision, expected[name]
        if row["path"] == "proto_clip":
            assert d.method == pb.METHOD_PROTOTYPE and d.rank == pb.RANK_SPECIES
            assert d.species == d.taxon and d.species[0].isupper()  # proper form
            assert d.species.lower() == row["best_label"]
        else:
            assert d.method == pb.METHOD_TAXON and d.species == ""
            assert d.taxon == row["best_label"]
            # the taxon's lineage as the seed gives it, ending at the taxon
            lineage = [t.name for t in resp.taxonomy.lineage]
            assert lineage[-1] == d.taxon and resp.taxonomy.lineage[-1].rank == d.rank
            assert resp.taxonomy.lineage[0].rank == pb.RANK_KINGDOM
        ranks = {rc.rank for rc in resp.rank_confidences}
        assert {pb.RANK_KINGDOM, pb.RANK_PHYLUM, pb.RANK_CLASS, pb.RANK_ORDER,
                pb.RANK_FAMILY} <= ranks
        seen.add(d.method)
    assert seen == {pb.METHOD_PROTOTYPE, pb.METHOD_TAXON}


def test_embeddings_of_another_width_are_refused(v2_server) -> None:
    stub = stub_for(v2_server)
    with pytest.raises(grpc.RpcError) as err:
        stub.Identify(pb.IdentifyRequest(embedding=[0.1] * 512))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "768" in err.value.details() and "512" in err.value.details()
    # the service is still healthy
    assert stub.GetServiceInfo(pb.GetServiceInfoRequest()).embedding_dim == 768


def test_restrict_to_never_leaks_through_the_rank_heads(v2_server) -> None:
    """Restricted to the crabs' order, no head may answer a taxon outside it."""
    _, features = crops()
    stub = stub_for(v2_server)
    for f in features[:20]:
        resp = stub.Identify(pb.IdentifyRequest(embedding=f.tolist(), restrict_to=["Decapoda"]))
        d = resp.decision
        assert all(c.species for c in resp.prototype_candidates)
        if d.rank == pb.RANK_FAMILY:
            assert d.taxon in {"Carcinidae", "Portunidae", "Xanthidae", "Grapsidae", "Majidae",
                               "Cancridae", "Eriphiidae", "Galatheidae", "Inachidae",
                               "Nephropidae", "Palaemonidae", "Polybiidae", "Porcellanidae"}
        if d.rank in (pb.RANK_ORDER, pb.RANK_CLASS, pb.RANK_PHYLUM, pb.RANK_KINGDOM):
            assert d.taxon in {"Decapoda", "Malacostraca", "Arthropoda", "Animalia"}


def test_infer_csv_writes_the_seed_v2_file(v2_bundle: Path, vit_l14_spec: str,
                                           tmp_path: Path, capsys) -> None:
    out = tmp_path / "predictions.csv"
    code = cli(["infer-csv", "--embeddings", str(FEATURES), "--output", str(out),
                "--bundle", str(v2_bundle), "--model", vit_l14_spec,
                "--data-dir", str(tmp_path / "data")])
    assert code == 0
    with open(out, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    with open(SEED_V2_DIR / "predictions.csv", newline="", encoding="utf-8") as f:
        seed_header = csv.DictReader(f).fieldnames
    assert header == seed_header
    expected = seed_rows()
    assert len(rows) == 79
    assert [r for r in rows if r != expected[r["image"]]] == []
    printed = capsys.readouterr().out
    assert "79 images identified" in printed and "species_name" in printed


def test_production_thresholds_are_flags(v2_bundle: Path, vit_l14_spec: str,
                                         tmp_path: Path) -> None:
    """REFERENCE.md §11: with 0.35 / 0.05, 58 of the 79 keep their level and label."""
    from biolit_id.index.core.types import PrototypeSet
    from biolit_id.server.decision.registry import scorer_for

    out = tmp_path / "production"
    assert cli(["import-seed", *seed_files("--threshold", "0.35", "--margin", "0.05"),
                "--model", vit_l14_spec, "--out", str(out)]) == 0
    names, features = crops()
    expected = seed_rows()
    bundle = load_bundle(out)
    assert bundle.extra["seed_v2"]["threshold"] == 0.35
    assert bundle.extra["seed_v2"]["margin"] == 0.05
    scorer = scorer_for(bundle)
    seed_name = scorer.settings.seed_name
    scores = scorer.score(features, PrototypeSet(tuple(bundle.species), bundle.prototypes, 0))
    same = 0
    for i, name in enumerate(names):
        rank, taxon = scores.rank[i], scores.taxon[i]
        level = {"species": "species_name", "family": "famille", "order": "ordre",
                 "class": "classe", "phylum": "phylum", "kingdom": "regne"}.get(rank, "rejeté")
        label = seed_name(taxon) if rank == "species" else taxon
        same += (level, label) == (expected[name]["best_level"], expected[name]["best_label"])
    assert same == 58


def test_bundles_of_another_model_are_refused(v2_bundle: Path, vit_l14_spec: str,
                                              demo_model_spec: str, tmp_path: Path) -> None:
    from biolit_id.server.app import start_server
    from biolit_id.server.config import ServerConfig

    # the 768-d v2 bundle on the 512-d model
    with pytest.raises(BundleError, match="768-d"):
        start_server(ServerConfig(model=demo_model_spec, bundle=v2_bundle, port=0,
                                  data_dir=tmp_path / "a"))
    # the 512-d v4 bundle on the 768-d model
    v4 = tmp_path / "v4"
    assert cli(["import-seed", "--classifier", str(SEED_DIR / "best_model_top50.pth"),
                "--prototypes", str(SEED_DIR / "prototypes_v4.pt"),
                "--model", demo_model_spec, "--out", str(v4)]) == 0
    with pytest.raises(BundleError, match="512-d"):
        load_bundle(v4, expect_dim=768)
    # importing v2 for a 512-d model is refused before anything is written
    assert cli(["import-seed", *seed_files(), "--model", demo_model_spec,
                "--out", str(tmp_path / "b")]) == 1
    assert not (tmp_path / "b").exists()
