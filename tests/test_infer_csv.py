"""``biolit-id infer-csv``: the seed's CSV from a folder, offline, as the service answers."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import numpy as np
import pytest
from synthetic_bundle import unit, write_bundle

from biolit_id.cli.infer_csv import TAXON_COLUMNS, errors_path
from biolit_id.cli.main import main as cli
from biolit_id.cli.seedcompat.formats import SEED_COLUMNS, SEED_RANKS, taxonomy_columns
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.types import SEED_METHOD_NAMES, Method, Thresholds
from conftest import photo_bytes, stub_for

SEED_METHODS = {"classifier_top50", "classifier_top50_low", "prototypical_rare", "rejected"}
PB_RANK = {"genus": pb.RANK_GENUS, "family": pb.RANK_FAMILY, "order": pb.RANK_ORDER,
           "class": pb.RANK_CLASS}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    (root / "a.jpg").write_bytes(photo_bytes(1, "JPEG"))
    (root / "b.png").write_bytes(photo_bytes(2, "PNG", mode="RGBA"))
    (root / "c.webp").write_bytes(photo_bytes(3, "WEBP"))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "notes.txt").write_text("not a photo", "utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "d.jpg").write_bytes(photo_bytes(4, "JPEG", size=(200, 300)))
    return root



def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _infer(photo_dir: Path, out: Path, model: str, *extra: str) -> int:
    return cli(["infer-csv", "--images", str(photo_dir), "--output", str(out), "--model", model,
                "--data-dir", str(out.parent / "data"), *extra])


def _is_rounded(text: str) -> bool:
    return len(text.split(".")[-1]) == 4 and 0.0 <= float(text) <= 1.0


def test_hybrid_csv_matches_the_service(photo_dir: Path, seed_bundle: Path, demo_model_spec: str,
                                        tmp_path: Path, make_server, capsys) -> None:
    out = tmp_path / "results.csv"
    code = _infer(photo_dir, out, demo_model_spec, "--bundle", str(seed_bundle),
                  "--recursive", "--taxonomy", "--batch-size", "3")
    assert code == 0
    header, rows = _read(out)
    assert header == [*SEED_COLUMNS, *taxonomy_columns(), *TAXON_COLUMNS]
    assert header[12:16] == ["pred_genre", "conf_genre", "pred_genre_2", "conf_genre_2"]
    assert [r["image"] for r in rows] == ["a.jpg", "b.png", "c.webp", "sub/d.jpg"]

    err_header, errors = _read(errors_path(out))
    assert err_header == ["image", "error"]
    assert [e["image"] for e in errors] == ["broken.jpg"]
    assert errors[0]["error"]

    summary = capsys.readouterr().out
    assert "4 images identified" in summary and "acceptance rate" in summary
    assert "1 unreadable" in summary

    # Each row is what the service answers for the same photo.
    stub = stub_for(make_server(bundle=seed_bundle))
    catalog = Catalog.load_default()
    for row in rows:
        assert row["methode"] in SEED_METHODS
        assert (row["espece_pred"] == "?") == (row["methode"] == "rejected")
        for col in ("confiance", "conf_common", "conf_proto"):
            assert _is_rounded(row[col]), (col, row[col])
        resp = stub.Identify(pb.IdentifyRequest(image=(photo_dir / row["image"]).read_bytes(),
                                                top_k=3))
        d = resp.decision
        assert row["methode"] == SEED_METHOD_NAMES[Method(d.method)]
        assert row["espece_pred"] == (d.species or "?")
        assert float(row["confiance"]) == round(d.confidence, 4)
        assert [row[f"top{i}_common"] for i in (1, 2, 3)] == [
            c.species for c in resp.classifier_candidates]
        assert [row[f"top{i}_proto"] for i in (1, 2, 3)] == [
            c.species for c in resp.prototype_candidates]
        assert float(row["conf_proto"]) == round(resp.prototype_candidates[0].score, 4)
        by_rank = {rc.rank: rc for rc in resp.rank_confidences}
        for seed_rank, rank in SEED_RANKS.items():
            if rank in PB_RANK:
                assert row[f"pred_{seed_rank}"] == by_rank[PB_RANK[rank]].taxon
                assert float(row[f"conf_{seed_rank}"]) == round(
                    by_rank[PB_RANK[rank]].confidence, 4)
            taxa = {r.taxon_at(rank) for r in catalog}
            assert row[f"pred_{seed_rank}"] in taxa and row[f"pred_{seed_rank}_2"] in taxa
            assert float(row[f"conf_{seed_rank}"]) >= float(row[f"conf_{seed_rank}_2"])
        # a taxon's mass includes its sub-taxa': coarser ranks are never less sure
        confs = [float(row[f"conf_{r}"]) for r in SEED_RANKS]
        assert confs == sorted(confs)


def test_folder_only_and_extension_filter(photo_dir: Path, seed_bundle: Path,
                                          demo_model_spec: str, tmp_path: Path) -> None:
    out = tmp_path / "flat.csv"
    assert _infer(photo_dir, out, demo_model_spec, "--bundle", str(seed_bundle)) == 0
    header, rows = _read(out)
    assert header == list(SEED_COLUMNS)
    assert [r["image"] for r in rows] == ["a.jpg", "b.png", "c.webp"]

    out = tmp_path / "webp.csv"
    assert _infer(photo_dir, out, demo_model_spec, "--bundle", str(seed_bundle),
                  "--ext", "webp", "--recursive") == 0
    assert [r["image"] for r in _read(out)[1]] == ["c.webp"]
    assert _read(errors_path(out))[1] == []


def test_zero_shot_without_bundle(photo_dir: Path, demo_model_spec: str, tmp_path: Path) -> None:
    out = tmp_path / "zs.csv"
    assert _infer(photo_dir, out, demo_model_spec, "--taxonomy") == 0
    _, rows = _read(out)
    names = set(Catalog.load_default().names())
    assert len(rows) == 3
    for row in rows:
        assert row["methode"] in {"zero_shot", "rejected"}
        assert (row["espece_pred"] == "?") == (row["methode"] == "rejected")
        assert row["top1_common"] == row["conf_common"] == ""
        assert {row["top1_proto"], row["top2_proto"], row["top3_proto"]} <= names
        assert row["pred_genre"]


def test_no_matching_photos_is_an_error(photo_dir: Path, demo_model_spec: str, tmp_path: Path,
                                        capsys) -> None:
    out = tmp_path / "none.csv"
    assert _infer(photo_dir, out, demo_model_spec, "--ext", "tif") == 1
    assert "no *.tif files" in capsys.readouterr().out
    assert not out.exists()


def test_bundle_for_another_model_is_refused(photo_dir: Path, seed_bundle: Path, tmp_path: Path,
                                             capsys) -> None:
    from biolit_id.cli.demo_model import write_demo_model

    other = write_demo_model(tmp_path / "other-model", seed=1)
    out = tmp_path / "r.csv"
    assert _infer(photo_dir, out, f"local-dir:{other}", "--bundle", str(seed_bundle)) == 1
    assert "fingerprint" in capsys.readouterr().out


def test_an_answer_above_species_level_keeps_the_seed_columns_meaning(
        photo_dir: Path, loaded_demo_model, demo_model_spec: str, tmp_path: Path) -> None:
    """Two near-identical limpet prototypes around a.jpg's embedding: the species mass
    splits, the genus passes its threshold: the service answers METHOD_TAXON Patella."""
    from biolit_id.server.config import ServerConfig
    from biolit_id.server.inference.embedders.eager import TorchEmbedder
    from biolit_id.server.inference.preprocess import preprocess
    from biolit_id.server.wiring import policy_for

    pixels = preprocess((photo_dir / "a.jpg").read_bytes(),
                        policy_for(loaded_demo_model, ServerConfig()))
    photo = TorchEmbedder(loaded_demo_model).embed(pixels[None])[0]
    species = ["Patella vulgata", "Patella caerulea", "Carcinus maenas", "Fucus serratus"]
    rng = np.random.default_rng(0)
    protos = unit(rng.normal(size=(len(species), photo.size)))
    protos[:2] = unit(photo + 0.02 * rng.normal(size=(2, photo.size)))
    bundle = write_bundle(tmp_path / "bundle", loaded_demo_model, species, protos,
                          thresholds=Thresholds(prototype=0.6),
                          taxon_thresholds={"genus": 0.8, "family": 0.8})

    out = tmp_path / "taxa.csv"
    assert _infer(photo_dir, out, demo_model_spec, "--bundle", str(bundle), "--taxonomy") == 0
    header, rows = _read(out)
    assert header == [*SEED_COLUMNS, *taxonomy_columns(), *TAXON_COLUMNS]
    for row in rows:
        assert row["methode"] in SEED_METHODS
        assert (row["espece_pred"] == "?") == (row["methode"] == "rejected")
        assert (row["taxon_pred"] != "") == (row["taxon_rank"] != "")
        if row["taxon_pred"]:
            assert row["methode"] == "rejected"
    a = next(r for r in rows if r["image"] == "a.jpg")
    assert (a["espece_pred"], a["methode"]) == ("?", "rejected")
    assert (a["taxon_pred"], a["taxon_rank"]) == ("Patella", "genre")
    assert a["pred_genre"] == "Patella" and float(a["conf_genre"]) >= 0.8
    assert a["top1_proto"] in species[:2] and float(a["conf_proto"]) < 0.6
    assert a["confiance"] == a["conf_proto"]  # the seed's rejection: max of the maxima

    out = tmp_path / "plain.csv"  # without --taxonomy: exactly the seed's columns
    assert _infer(photo_dir, out, demo_model_spec, "--bundle", str(bundle)) == 0
    header, rows = _read(out)
    assert header == list(SEED_COLUMNS)
    plain = next(r for r in rows if r["image"] == "a.jpg")
    assert plain == {k: a[k] for k in SEED_COLUMNS}


def test_the_gallery_is_closed_and_one_of_another_model_is_refused(
        photo_dir: Path, demo_model_spec: str, tmp_path: Path, capsys) -> None:
    from biolit_id.cli.demo_model import write_demo_model

    def batchers() -> int:
        return sum(t.name == "embed-batcher" and t.is_alive() for t in threading.enumerate())

    running = batchers()
    assert _infer(photo_dir, tmp_path / "zs.csv", demo_model_spec) == 0
    assert batchers() == running  # the state's batcher thread is stopped
    store = tmp_path / "data" / "gallery" / "gallery.sqlite3"
    assert store.is_file() and not store.with_name(store.name + "-wal").exists()  # closed

    other = write_demo_model(tmp_path / "other-model", seed=1)
    capsys.readouterr()
    assert _infer(photo_dir, tmp_path / "other.csv", f"local-dir:{other}") == 1
    printed = capsys.readouterr().out
    assert f"cannot read the gallery in {tmp_path / 'data'}" in printed
    assert "another model" in printed


def test_embeddings_instead_of_photos(seed_bundle: Path, demo_model_spec: str, tmp_path: Path,
                                      make_server) -> None:
    """`biolit-id embed`'s parquet in place of photos: rows as the service answers them;
    a vector the service would refuse goes to the errors file, named."""
    from biolit_id.cli.training.datasets import EmbeddingSet, write_embeddings

    rng = np.random.default_rng(4)
    vectors = unit(rng.normal(size=(3, 512))).astype(np.float32)
    vectors[1] = 0.0
    path = write_embeddings(tmp_path / "emb.parquet", EmbeddingSet(
        ["", "", ""], vectors, ["x/one.jpg", "x/zero.jpg", "x/two.jpg"]))
    out = tmp_path / "emb.csv"
    assert cli(["infer-csv", "--embeddings", str(path), "--output", str(out), "--model",
                demo_model_spec, "--bundle", str(seed_bundle),
                "--data-dir", str(tmp_path / "data")]) == 0
    header, rows = _read(out)
    assert header == list(SEED_COLUMNS)
    assert [r["image"] for r in rows] == ["x/one.jpg", "x/two.jpg"]
    assert [(e["image"], "all zeros" in e["error"]) for e in _read(errors_path(out))[1]] == [
        ("x/zero.jpg", True)]
    stub = stub_for(make_server(bundle=seed_bundle))
    for row, vec in zip(rows, vectors[[0, 2]], strict=True):
        d = stub.Identify(pb.IdentifyRequest(embedding=vec.tolist(), top_k=3)).decision
        assert row["espece_pred"] == (d.species or "?")
        assert float(row["confiance"]) == round(d.confidence, 4)


def test_embedding_input_needs_one_source(tmp_path: Path, demo_model_spec: str,
                                          capsys) -> None:
    with pytest.raises(SystemExit):
        cli(["infer-csv", "--output", str(tmp_path / "o.csv"), "--model", demo_model_spec])
    assert cli(["infer-csv", "--embeddings", str(tmp_path / "missing.npz"), "--output",
                str(tmp_path / "o.csv"), "--model", demo_model_spec]) == 1
    assert "does not exist" in capsys.readouterr().out
