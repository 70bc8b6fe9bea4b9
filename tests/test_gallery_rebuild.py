"""``biolit-id gallery rebuild`` and ``serve --gallery-refine-every``: exact prototypes again.

Real SQLite/FAISS and milvus-lite, the demo model (zero-shot), the CLI run
in-process. Adds move prototypes through running sums; these check that the
rebuild and the background refiner bring them to what ``refine()`` computes,
that an IVF rebuild reads only its training sample before training and then
every photo once in bounded chunks, and that a rebuild and a server never
hold one FAISS gallery together.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from gallery_helpers import open_test_gallery

from biolit_id.cli import serve
from biolit_id.cli.main import main
from biolit_id.cli.maintenance.rebuild import open_offline_gallery
from biolit_id.index.base import GalleryInUseError
from biolit_id.index.faiss import gallery as faiss_gallery
from biolit_id.index.faiss.vector_index import VectorIndex
from biolit_id.index.prototypes import SpeciesSums
from biolit_id.index.store import GalleryStore, NewExemplar
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.config import ServerConfig
from biolit_id.server.decision.zero_shot import ZeroShotScorer
from biolit_id.server.inference.text_prototypes import TextPrototypeCache
from biolit_id.server.wiring import initial_prototypes, open_service_gallery
from conftest import wait_for

DIM = 512


@pytest.fixture(scope="module")
def text_cache(loaded_demo_model, tmp_path_factory) -> TextPrototypeCache:
    return TextPrototypeCache(loaded_demo_model, tmp_path_factory.mktemp("text-cache"))


def photos(seed: int, n: int, outliers: int = 0) -> np.ndarray:
    """n unit vectors around one centre, the last ``outliers`` of them far from it: the
    similarity-weighted prototype discounts those, a plain running sum does not."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=DIM)
    x = centre + 0.6 * rng.normal(size=(n, DIM)) * np.linalg.norm(centre) / np.sqrt(DIM)
    x[n - outliers:] = rng.normal(size=(outliers, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def item(species: str, vec: np.ndarray) -> NewExemplar:
    digest = hashlib.sha256(vec.tobytes() + species.encode()).hexdigest()
    return NewExemplar(species=species, embedding=vec, content_sha256=digest,
                       source_uri=f"test://{digest[:12]}")


def rows_of(gallery, names: list[str]) -> np.ndarray:
    protos = gallery.prototypes()
    index = protos.index()
    return np.stack([protos.vectors[index[n]] for n in names])


def exact_rows(gallery, names: list[str], photos_of) -> np.ndarray:
    """Each species' prototype computed from scratch from all its photos."""
    return np.stack([gallery.builder.fused_from_sums(
        n, SpeciesSums.refined(gallery.project(photos_of(n)))) for n in names])


def rebuild_cli(model_spec: str, data: Path, *extra: str) -> int:
    return main(["gallery", "rebuild", "--model", model_spec, "--data-dir", str(data),
                 "--no-progress", *extra])



# ------------------------------------------------------------------- FAISS


def test_rebuild_brings_running_sums_to_what_refine_computes(
        tmp_path, loaded_demo_model, demo_model_spec, text_cache, capsys):
    data = tmp_path / "data"
    gallery = open_test_gallery("faiss", data, loaded_demo_model, text_cache)
    names = list(gallery.prototypes().names[:3])
    gallery.add_many([item(names[0], v) for v in photos(1, 60, outliers=12)])
    for v in photos(2, 40, outliers=8):  # the servicer's path: one add at a time
        gallery.add_exemplar(item(names[1], v), refresh=False)
    gallery.refresh([names[1]])
    untouched = rows_of(gallery, names[2:])  # no photos: keeps its text prototype
    running = rows_of(gallery, names[:2])
    gallery.close()

    # What refine() makes of the same gallery, on a copy of it.
    shutil.copytree(data, tmp_path / "copy")
    reference = open_test_gallery("faiss", tmp_path / "copy", loaded_demo_model, text_cache)
    assert sorted(reference.refine()) == sorted(names[:2])
    refined = rows_of(reference, names[:2])
    reference.close()
    assert np.abs(running - refined).max() > 1e-3  # the running sums did drift

    assert rebuild_cli(demo_model_spec, data) == 0
    out = capsys.readouterr().out
    assert "refined 2 species" in out and "100 photos, flat" in out and "peak RSS" in out

    again = open_test_gallery("faiss", data, loaded_demo_model, text_cache)
    try:
        assert again.recovery == "snapshot"  # the rebuild left a snapshot of its index
        np.testing.assert_allclose(rows_of(again, names[:2]), refined, atol=1e-5)
        np.testing.assert_allclose(rows_of(again, names[2:]), untouched, atol=1e-6)
        assert not again.drifted(1e-9)
        np.testing.assert_allclose(
            rows_of(again, names[:2]),
            exact_rows(again, names[:2], lambda n: again.store.embeddings_for(n)[1]), atol=1e-5)
        assert np.array_equal(again.index.exemplar_ids(), again.store.all_ids())
    finally:
        again.close()


def test_rebuild_of_one_species_and_unknown_names(tmp_path, loaded_demo_model, demo_model_spec,
                                                  text_cache, capsys):
    data = tmp_path / "data"
    gallery = open_test_gallery("faiss", data, loaded_demo_model, text_cache)
    names = list(gallery.prototypes().names[:2])
    for seed, name in enumerate(names):
        gallery.add_many([item(name, v) for v in photos(10 + seed, 30, outliers=6)])
    before = rows_of(gallery, names)
    gallery.close()

    assert rebuild_cli(demo_model_spec, data, "--species", "Nonexistus fictus") == 2
    assert "unknown species Nonexistus fictus" in capsys.readouterr().err
    assert rebuild_cli(demo_model_spec, data, "--species", names[1], "--no-index") == 0
    assert "refined 1 species; index: kept (flat)" in capsys.readouterr().out

    again = open_test_gallery("faiss", data, loaded_demo_model, text_cache)
    try:
        after = rows_of(again, names)
        np.testing.assert_array_equal(after[0], before[0])  # not asked for: unchanged
        assert np.abs(after[1] - before[1]).max() > 1e-3
        assert again.drifted(0.5) == [names[0]]
    finally:
        again.close()


def test_ivf_rebuild_reads_only_the_sample_to_train_then_every_photo_in_chunks(
        tmp_path, monkeypatch, loaded_demo_model, demo_model_spec, text_cache, capsys):
    data, spec = tmp_path / "data", "faiss:ivf-flat,nlist=8"
    gallery = open_test_gallery(spec, data, loaded_demo_model, text_cache)
    names = list(gallery.prototypes().names[:4])
    vectors = np.concatenate([photos(20 + i, 750) for i in range(4)])
    gallery.add_many([item(names[i % 4], v) for i, v in enumerate(vectors[:3000])])
    gallery.close()
    gallery = open_test_gallery(spec, data, loaded_demo_model, text_cache)  # trained on 3000
    assert gallery.index.spec.kind == "ivf-flat"
    n_protos = len(gallery.prototypes().names)
    gallery.close()

    monkeypatch.setattr(faiss_gallery, "TRAINING_SAMPLE", 400)
    monkeypatch.setattr(faiss_gallery, "INDEX_CHUNK", 700)
    reads: list[tuple[str, int]] = []
    by_ids, chunks = GalleryStore.embeddings_by_ids, GalleryStore.iter_embeddings

    def counted_by_ids(self, ids):
        found = by_ids(self, ids)
        reads.append(("by-id", len(found[0])))
        return found

    def counted_chunks(self, chunk=4096):
        for ids, raw in chunks(self, chunk):
            reads.append(("chunk", len(ids)))
            yield ids, raw

    trainings: list[tuple[int, int]] = []  # (training vectors, photos read before training)
    build = VectorIndex.build.__func__

    def counted_build(cls, index_spec, dim, training=None):
        if training is not None:
            trainings.append((len(training), sum(n for _, n in reads)))
        return build(cls, index_spec, dim, training)

    monkeypatch.setattr(GalleryStore, "embeddings_by_ids", counted_by_ids)
    monkeypatch.setattr(GalleryStore, "iter_embeddings", counted_chunks)
    monkeypatch.setattr(VectorIndex, "build", classmethod(counted_build))
    assert rebuild_cli(demo_model_spec, data, "--gallery", spec, "--no-index") == 0
    assert reads == [("by-id", 0)] and not trainings  # a snapshot, nothing replayed
    reads.clear()
    assert rebuild_cli(demo_model_spec, data, "--gallery", spec) == 0
    assert "3000 photos, ivf-flat,nlist=8" in capsys.readouterr().out

    # Trained once, on the prototypes and 400 drawn photos: all that was read by then.
    assert trainings == [(400 + n_protos, 400)]
    chunk_sizes = [n for kind, n in reads if kind == "chunk"]
    assert chunk_sizes == [700, 700, 700, 700, 200]  # every photo once, in bounded chunks
    assert sum(n for _, n in reads) == 400 + 3000

    again = open_test_gallery(spec, data, loaded_demo_model, text_cache)
    try:
        assert again.recovery == "snapshot" and again.index.spec.kind == "ivf-flat"
        assert np.array_equal(again.index.exemplar_ids(), again.store.all_ids())
        probe_id = int(again.store.all_ids()[1234])
        probe = again.store.embedding(probe_id)[1]
        assert again.search(probe[None, :], 1)[0][0].exemplar_id == probe_id

        # A sample too small for the lists (39 per list) grows to what they need
        # instead of falling back to flat; a live gallery swaps its index when done.
        monkeypatch.setattr(faiss_gallery, "TRAINING_SAMPLE", 10)
        assert again.rebuild_index() == 3000
        assert again.index.spec.kind == "ivf-flat"
        assert trainings[-1][0] == 8 * 39
        assert again.search(probe[None, :], 1)[0][0].exemplar_id == probe_id
    finally:
        again.close()


def test_rebuild_and_a_server_never_hold_one_faiss_gallery_together(
        make_server, tmp_path, loaded_demo_model, demo_model_spec, text_cache, capsys):
    data = tmp_path / "data"  # make_server's
    running = make_server(data_dir=data)
    assert rebuild_cli(demo_model_spec, data) == 2
    assert "in use by a running server" in capsys.readouterr().err
    running.stop(0.5)

    held = open_offline_gallery("faiss", demo_model_spec, None, data)
    try:
        with pytest.raises(GalleryInUseError, match="being rebuilt"):
            open_test_gallery("faiss", data, loaded_demo_model, text_cache)  # a server's open
        assert rebuild_cli(demo_model_spec, data) == 2  # nor two rebuilds
    finally:
        held.close()
    assert rebuild_cli(demo_model_spec, data) == 0
    server = open_test_gallery("faiss", data, loaded_demo_model, text_cache)
    other = open_test_gallery("faiss", data, loaded_demo_model, text_cache)  # servers share
    other.close()
    server.close()


def test_server_flag_refines_drifted_species_in_the_background(make_server, tmp_path):
    args = argparse.ArgumentParser()
    serve.add_arguments(args)
    config = serve.config_from_args(args.parse_args(["--gallery-refine-every", "0.2"]))
    assert config.gallery_refine_every == 0.2
    assert serve.config_from_args(args.parse_args([])).gallery_refine_every == 0

    running = make_server(gallery_refine_every=0.2)
    gallery = running.state.gallery
    name = gallery.prototypes().names[0]
    gallery.add_many([item(name, v) for v in photos(5, 50, outliers=10)])
    assert wait_for(lambda: not gallery.drifted(0.1), timeout=20)
    np.testing.assert_allclose(
        rows_of(gallery, [name]),
        exact_rows(gallery, [name], lambda n: gallery.store.embeddings_for(n)[1]), atol=1e-5)
    assert gallery.store.species_sums(gallery.space_id)[name].refined_count == 50

    quiet = make_server(data_dir=tmp_path / "quiet")
    assert quiet.state.gallery._refiner is None  # 0: off


# ------------------------------------------------------------------ Milvus


def test_milvus_rebuild_writes_refined_rows_and_the_flag_overrides_the_uri(
        tmp_path, loaded_demo_model, demo_model_spec, text_cache, capsys):
    uri = f"milvus-lite:{tmp_path}/milvus/g.db"
    data = tmp_path / "data"

    def open_milvus(query: str = "", refine_every: float = 0.0):
        catalog = Catalog.load_default()
        scorer = ZeroShotScorer()
        config = ServerConfig(model=demo_model_spec, data_dir=data, gallery=uri + query,
                              gallery_refine_every=refine_every)
        return open_service_gallery(config, model=loaded_demo_model, catalog=catalog, scorer=scorer,
                            text_cache=text_cache,
                            base=initial_prototypes(catalog, scorer, text_cache))

    def photos_in(g):
        return lambda n: g.index.embeddings_for(n)[1]

    gallery = open_milvus("?poll=0")
    names = list(gallery.prototypes().names[:2])
    for seed, name in enumerate(names):
        gallery.add_many([item(name, v) for v in photos(30 + seed, 40, outliers=8)])
    assert sorted(gallery.drifted(0.5)) == sorted(names)
    running = rows_of(gallery, names)
    gallery.close()

    assert main(["gallery", "rebuild", "--gallery", uri, "--model", demo_model_spec,
                 "--data-dir", str(data), "--no-progress"]) == 0
    assert "refined 2 species; index: Milvus maintains its own" in capsys.readouterr().out

    # A replica opening (or syncing) installs the refined rows; the flag's period wins
    # over the URI's refine=.
    gallery = open_milvus("?poll=0&refine=3600", refine_every=0.2)
    try:
        assert not gallery.drifted(1e-9)
        refined = exact_rows(gallery, names, photos_in(gallery))
        np.testing.assert_allclose(rows_of(gallery, names), refined, atol=1e-5)
        assert np.abs(running - refined).max() > 1e-3
        gallery.add_many([item(names[0], v) for v in photos(40, 20, outliers=5)])
        assert wait_for(lambda: gallery._sums[names[0]].refined_count == 60, timeout=30)
        np.testing.assert_allclose(rows_of(gallery, names[:1]),
                                   exact_rows(gallery, names[:1], photos_in(gallery)),
                                   atol=1e-5)
    finally:
        gallery.close()
