"""The Milvus gallery against the FAISS gallery, in a bundle's whitened space, without gRPC.

Both are opened the way ``build_state`` opens them, fed the same photos, and
must hold the same prototypes and give the same similar-photo answers; the
Milvus one must come back identical after a restart (its state is in Milvus).
Each test runs on milvus-lite and on a real Milvus server (``milvus_fixtures``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
from gallery_helpers import open_test_gallery, whitened_bundle

from biolit_id.index.base import UnknownExemplarError, UnknownSpeciesError
from biolit_id.index.core.vectors import fuse_prototypes
from biolit_id.index.milvus.rows import exemplar_id_for
from biolit_id.index.store import NewExemplar
from biolit_id.server.catalog.catalog import Catalog, SpeciesRecord
from biolit_id.server.decision.bundle import Bundle
from biolit_id.server.inference.text_prototypes import TextPrototypeCache

DIM = 512


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def text_cache(loaded_demo_model, tmp_path_factory) -> TextPrototypeCache:
    return TextPrototypeCache(loaded_demo_model, tmp_path_factory.mktemp("text-cache"))


@pytest.fixture
def open_pair(loaded_demo_model, text_cache, tmp_path: Path):
    opened = []

    def _open(gallery: str, bundle: Bundle):
        g = open_test_gallery(gallery, tmp_path / "data", loaded_demo_model, text_cache, bundle)
        opened.append(g)
        return g

    yield _open
    for g in opened:
        g.close()


def item(species: str, vec: np.ndarray) -> NewExemplar:
    digest = hashlib.sha256(np.asarray(vec, "<f4").tobytes() + species.encode()).hexdigest()
    return NewExemplar(species=species, embedding=np.asarray(vec, np.float32),
                       content_sha256=digest, source_uri=f"test://{digest[:12]}")


def same_prototypes(a, b) -> None:
    pa, pb = a.prototypes(), b.prototypes()
    assert set(pa.names) == set(pb.names)
    ia, ib = pa.index(), pb.index()
    for name in pa.names:
        np.testing.assert_allclose(pa.vectors[ia[name]], pb.vectors[ib[name]], atol=1e-5,
                                   err_msg=name)


def test_milvus_and_faiss_galleries_agree_and_milvus_survives_a_restart(
        open_pair, milvus_uri, loaded_demo_model, text_cache, tmp_path):
    catalog = Catalog.load_default()
    names = catalog.names()
    bundle = whitened_bundle(loaded_demo_model, catalog, text_cache,
                             extra={"prototype_support": {names[3]: 4}},
                             bundle_id="milvus-test-bundle")
    lite = milvus_uri("poll=0")
    faiss_g, milvus_g = open_pair("faiss", bundle), open_pair(lite, bundle)
    assert milvus_g.dim == faiss_g.dim == 64 and milvus_g.space_id == faiss_g.space_id
    rng = np.random.default_rng(5)
    # species: in the bundle with support, in the bundle without, in the catalog only
    photos = {name: unit(unit(rng.normal(size=DIM)) + 0.05 * rng.normal(size=(4, DIM)))
              for name in (names[3], names[8], names[40])}
    ids: dict[str, list[int]] = {"faiss": [], "milvus": []}
    for name, vecs in photos.items():
        for vec in vecs:
            ids["faiss"].append(faiss_g.add_exemplar(item(name, vec), refresh=False).exemplar_id)
            ids["milvus"].append(milvus_g.add_exemplar(item(name, vec),
                                                       refresh=False).exemplar_id)
        faiss_g.refresh([name])
        milvus_g.refresh([name])
    new = SpeciesRecord(scientific_name="Milvusia gemina", taxonomy={"genus": "Milvusia"})
    for g in (faiss_g, milvus_g):
        g.add_species(new)
        g.remove([ids["faiss" if g is faiss_g else "milvus"][0]])
    same_prototypes(faiss_g, milvus_g)
    assert milvus_g.exemplar_counts() == faiss_g.exemplar_counts() == {
        names[3]: 3, names[8]: 4, names[40]: 4}

    queries = unit(rng.normal(size=(3, DIM)))
    queries[0] = photos[names[8]][1]
    for species in (None, [names[40]]):
        want = faiss_g.search(queries, 5, species=species)
        got = milvus_g.search(queries, 5, species=species)
        for w, g in zip(want, got, strict=True):
            assert [h.source_uri for h in g] == [h.source_uri for h in w]
            np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=1e-5)

    with pytest.raises(UnknownSpeciesError):
        milvus_g.add_exemplar(item("Nonexistens species", photos[names[3]][0]))
    with pytest.raises(UnknownExemplarError):
        milvus_g.remove([ids["milvus"][1], 12345])
    assert milvus_g.size == 11  # all or nothing: nothing was removed

    # Restart: everything comes back from Milvus.
    before = milvus_g.prototypes()
    version = milvus_g.version
    milvus_g.close()
    again = open_pair(lite, bundle)
    same_prototypes(again, faiss_g)
    assert again.knows("Milvusia gemina")
    assert again.version == version
    assert again.prototypes().names[:len(bundle.species)] == before.names[:len(bundle.species)]
    rows, total = again.list_exemplars([names[40]], 0, 10, include_thumbnails=False)
    assert total == 4 and [r.exemplar_id for r in rows] == sorted(r.exemplar_id for r in rows)


def crash_write(g, species: str, vec: np.ndarray) -> NewExemplar:
    """What a replica killed between upserting a photo and its species row leaves behind."""
    new = item(species, vec)
    eid = exemplar_id_for(species, new.content_sha256)
    g.index.insert([g.index.exemplar_row(eid, species, g.project(vec[None, :])[0], vec,
                                         content_sha256=new.content_sha256, added_at=0.0)])
    return new


def test_a_photo_stored_without_its_species_row_reaches_the_prototype(
        open_pair, milvus_uri, loaded_demo_model, text_cache, tmp_path):
    catalog = Catalog.load_default()
    names = catalog.names()
    bundle = whitened_bundle(loaded_demo_model, catalog, text_cache, extra={},
                             bundle_id="crash-test-bundle")
    lite = milvus_uri("poll=0")
    faiss_g, milvus_g = open_pair("faiss", bundle), open_pair(lite, bundle)
    rng = np.random.default_rng(11)
    photos = unit(rng.normal(size=(5, DIM)))
    a, b = names[3], names[40]  # b: no photo, hence no species row, before the crash
    for vec in photos[:2]:
        faiss_g.add_exemplar(item(a, vec))
        milvus_g.add_exemplar(item(a, vec))
    for species, vec in ((a, photos[2]), (b, photos[3])):
        retried = crash_write(milvus_g, species, vec)
        faiss_g.add_exemplar(item(species, vec))
        # The client's retry finds its photo stored, so nothing refreshes the prototype.
        assert milvus_g.find(species, retried.content_sha256) is not None
    stale, want = milvus_g.prototypes(), faiss_g.prototypes()
    assert not np.allclose(stale.vectors[stale.index()[a]], want.vectors[want.index()[a]],
                           atol=1e-3)

    milvus_g.close()
    again = open_pair(lite, bundle)  # any replica's start repairs the shared rows
    faiss_g.refine()  # a repair recomputes from every photo, as a refinement does
    same_prototypes(again, faiss_g)
    assert again.exemplar_counts() == faiss_g.exemplar_counts() == {a: 3, b: 1}

    crash_write(again, a, photos[4])  # and a running replica's full sweep
    faiss_g.add_exemplar(item(a, photos[4]))
    assert again.sync_now() == 0  # incremental polls only read changed rows
    # Repaired only once the disagreement has outlived a whole sweep unchanged (a stream
    # still being written through another replica looks the same at first).
    assert again.sync_now(full=True) == 0
    assert again.sync_now(full=True) == 1
    faiss_g.refine([a])
    same_prototypes(again, faiss_g)
    assert again.exemplar_counts()[a] == 4


def test_a_new_bundle_in_the_same_space_keeps_the_collection_and_recomputes(
        open_pair, milvus_uri, loaded_demo_model, text_cache, tmp_path):
    catalog = Catalog.load_default()
    names = catalog.names()
    before = whitened_bundle(loaded_demo_model, catalog, text_cache, extra={},
                             bundle_id="before")
    rng = np.random.default_rng(12)
    visual = unit(before.visual_prototypes + rng.normal(size=before.visual_prototypes.shape))
    after = dataclasses.replace(  # same whitening, other prototypes and weights file
        before, bundle_id="after", visual_prototypes=visual,
        prototypes=fuse_prototypes(visual, before.text_prototypes, before.alpha))
    lite = milvus_uri("poll=0")
    first = open_pair(lite, before)
    photos = unit(rng.normal(size=(3, DIM)))
    for vec in photos:
        first.add_exemplar(item(names[3], vec))  # a bundle species: its prior counts
    first.close()

    again, faiss_g = open_pair(lite, after), open_pair("faiss", after)
    assert again.space_id == first.space_id == faiss_g.space_id
    for vec in photos:
        faiss_g.add_exemplar(item(names[3], vec))
    same_prototypes(again, faiss_g)


def test_a_photo_imported_with_its_faiss_id_is_found_again(open_pair, milvus_uri,
                                                           loaded_demo_model, text_cache,
                                                           tmp_path):
    lite = milvus_uri("poll=0")
    g = open_pair(lite, whitened_bundle(loaded_demo_model, Catalog.load_default(), text_cache,
                                        extra={}, bundle_id="import-test"))
    name = g.prototypes().names[2]
    photo = item(name, unit(np.random.default_rng(13).normal(size=DIM)))
    assert g.import_rows([{"id": 7, "species": name, "embedding": photo.embedding,
                           "content_sha256": photo.content_sha256}]) == 1
    g.refresh([name])
    assert g.find(name, photo.content_sha256) == 7
    again = g.add_exemplar(photo)
    assert (again.exemplar_id, again.created) == (7, False)
    assert g.index.count() == 1 and g.exemplar_counts() == {name: 1}
