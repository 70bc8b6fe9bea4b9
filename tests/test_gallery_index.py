"""The gallery's parts without gRPC: prototypes, FAISS index, snapshots, store, recovery."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gallery_helpers import open_test_gallery, whitened_bundle

from biolit_id.index.base import (
    SpeciesExistsError,
    UnknownExemplarError,
    UnknownSpeciesError,
)
from biolit_id.index.core.vectors import fuse_prototypes
from biolit_id.index.faiss.gallery import SNAPSHOT_FILE, STORE_FILE
from biolit_id.index.faiss.snapshot import (
    SnapshotError,
    SnapshotMeta,
    read_snapshot,
    write_snapshot,
)
from biolit_id.index.faiss.vector_index import (
    PROTOTYPE_ID_BASE,
    IndexSpec,
    IndexSpecError,
    RWLock,
    VectorIndex,
)
from biolit_id.index.prototypes import (
    DEFAULT_PRIOR_WEIGHT,
    combine_with_prior,
    weighted_prototype,
)
from biolit_id.index.store import GalleryStore, NewExemplar, StoreError
from biolit_id.server.catalog.catalog import Catalog, SpeciesRecord
from biolit_id.server.decision.bundle import Bundle, load_bundle
from biolit_id.server.decision.seed_cascade import SeedCascadeScorer
from biolit_id.server.decision.zero_shot import ZERO_SHOT_ALPHA
from biolit_id.server.inference.text_prototypes import TextPrototypeCache
from biolit_id.server.wiring import space_id_for

DIM = 512


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def family(seed: int, n: int, spread: float = 0.05, dim: int = DIM) -> np.ndarray:
    """n unit vectors around one random centre (a synthetic species)."""
    rng = np.random.default_rng(seed)
    centre = unit(rng.normal(size=dim))
    return unit(centre + spread * rng.normal(size=(n, dim)))


def item(species: str, vec: np.ndarray, tag: str = "") -> NewExemplar:
    import hashlib

    digest = hashlib.sha256(np.asarray(vec, "<f4").tobytes() + tag.encode()).hexdigest()
    return NewExemplar(species=species, embedding=np.asarray(vec, np.float32),
                       content_sha256=digest, source_uri=f"test://{digest[:8]}")


@pytest.fixture(scope="module")
def text_cache(loaded_demo_model, tmp_path_factory) -> TextPrototypeCache:
    return TextPrototypeCache(loaded_demo_model, tmp_path_factory.mktemp("text-cache"))


@pytest.fixture
def open_at(loaded_demo_model, text_cache):
    """Open a gallery the way build_state does (fresh catalog each time, like a restart)."""
    opened = []

    def _open(directory: Path, spec: str = "flat", bundle: Bundle | None = None, **extra):
        gallery = open_test_gallery(f"faiss:{spec}", directory, loaded_demo_model, text_cache,
                                    bundle, **extra)
        opened.append(gallery)
        return gallery

    yield _open
    for gallery in opened:
        gallery.close()


# ----------------------------------------------------------------- prototypes


def test_weighted_prototype_discounts_an_outlier() -> None:
    photos = family(1, 6, spread=0.05)
    outlier = family(2, 1)[0]
    x = np.vstack([photos, outlier])
    centre = unit(photos.mean(axis=0))
    plain = unit(x.mean(axis=0))
    refined = weighted_prototype(x)
    assert float(refined @ centre) > float(plain @ centre) + 0.01
    assert abs(float(np.linalg.norm(refined)) - 1.0) < 1e-5
    # One photo: the prototype is that photo.
    np.testing.assert_allclose(weighted_prototype(x[:1]), x[0], atol=1e-6)
    # Deterministic, so restarts recompute identical vectors.
    assert np.array_equal(weighted_prototype(x), refined)


def test_prior_counts_as_many_photos_as_its_weight() -> None:
    prior, estimate = unit(np.array([1.0, 0.0])), unit(np.array([0.0, 1.0]))
    balanced = combine_with_prior(prior, 3.0, estimate, 3)
    np.testing.assert_allclose(balanced, unit(np.array([1.0, 1.0])), atol=1e-6)
    mostly_prior = combine_with_prior(prior, DEFAULT_PRIOR_WEIGHT, estimate, 1)
    assert mostly_prior[0] > 0.99
    np.testing.assert_allclose(combine_with_prior(None, 10, estimate, 1), estimate)


# ----------------------------------------------------------------- FAISS index


def test_index_spec_parsing() -> None:
    assert IndexSpec.parse("") == IndexSpec()
    spec = IndexSpec.parse("ivf-flat,nlist=64,nprobe=8")
    assert (spec.kind, spec.nlist, spec.nprobe) == ("ivf-flat", 64, 8)
    for bad in ("hnsw", "ivf-flat,nlist=x", "flat,foo=1", "ivf-flat,nprobe=0"):
        with pytest.raises(IndexSpecError):
            IndexSpec.parse(bad)
    # Too few vectors to train IVF: exact flat instead (logged).
    assert IndexSpec.parse("ivf-flat,nlist=64").resolve(100, 32).kind == "flat"
    assert IndexSpec.parse("auto,auto_threshold=10").resolve(5000, 32).kind == "ivf-sq8"
    assert IndexSpec.parse("auto").resolve(5000, 32).kind == "flat"


@pytest.mark.parametrize("spec", ["flat", "ivf-flat,nlist=8,nprobe=8", "ivf-sq8,nlist=8,nprobe=8",
                                  "ivf-pq,nlist=4,nprobe=4"])
def test_index_add_remove_search_and_prototypes(spec: str) -> None:
    dim = 16
    n = 2600  # enough to train PQ codebooks (256 centroids per sub-quantiser)
    vectors = family(3, n, spread=0.6, dim=dim)
    index = VectorIndex.build(IndexSpec.parse(spec), dim, training=vectors)
    assert index.spec.kind == spec.split(",")[0]
    ids = np.arange(1, n + 1)
    index.add(ids, vectors)
    protos = family(4, 3, dim=dim)
    index.set_prototypes([0, 1, 2], protos)
    assert index.exemplar_count == n
    # Searching with a prototype never returns a prototype id.
    _, found = index.search_exemplars(protos, 5)
    assert (found < PROTOTYPE_ID_BASE).all() and (found > 0).all()
    # A photo finds itself first (exact for flat/IVF-flat, PQ is approximate).
    _, found = index.search_exemplars(vectors[:20], 1)
    hits = np.mean(found[:, 0] == ids[:20])
    assert hits == 1.0 if "pq" not in spec else hits >= 0.5
    # Removal: gone from search, and prototypes are still addressable afterwards.
    assert index.remove(ids[:10]) == 10
    _, found = index.search_exemplars(vectors[:10], 5)
    assert not set(found.ravel()) & set(ids[:10].tolist())
    assert index.exemplar_count == n - 10
    index.set_prototypes([1], protos[2:3])
    if "pq" not in spec:  # SQ8 keeps one byte per dimension: within a quantisation step
        atol = 1e-2 if "sq8" in spec else 1e-6
        np.testing.assert_allclose(index.prototype_vector(1), protos[2], atol=atol)
    # Restricting to some ids.
    _, found = index.search_exemplars(vectors[:1], 10, only_ids=np.array([300, 301]))
    assert set(found[0][found[0] >= 0].tolist()) == {300, 301}
    # Serialisation round trip keeps ids and prototypes.
    copy = VectorIndex.from_bytes(index.to_bytes(), index.spec, dim)
    assert np.array_equal(copy.exemplar_ids(), index.exemplar_ids())
    assert copy.exemplar_count == n - 10


def test_flat_prototype_overwrite_survives_compaction() -> None:
    dim = 8
    index = VectorIndex.build(IndexSpec(), dim)
    index.set_prototypes([0, 1], family(5, 2, dim=dim))
    index.add([1, 2, 3], family(6, 3, dim=dim))
    index.set_prototypes([2], family(7, 1, dim=dim))  # appended after the exemplars
    index.remove([1, 2])  # compaction moves the appended prototype
    new = family(8, 1, dim=dim)[0]
    index.set_prototypes([2], new[None, :])
    np.testing.assert_allclose(index.prototype_vector(2), new, atol=1e-6)
    assert index.ntotal == 4 and index.exemplar_count == 1


def test_rwlock_writer_waits_for_readers_and_blocks_new_ones() -> None:
    lock = RWLock()
    events: list[str] = []
    reader_in = threading.Event()

    def reader() -> None:
        with lock.read():
            reader_in.set()
            time.sleep(0.2)
            events.append("reader done")

    def writer() -> None:
        with lock.write():
            events.append("writer")

    t1 = threading.Thread(target=reader)
    t1.start()
    reader_in.wait()
    t2 = threading.Thread(target=writer)
    t2.start()
    t1.join()
    t2.join()
    assert events == ["reader done", "writer"]


# ------------------------------------------------------------------- snapshots


def test_snapshot_round_trip_and_corruption(tmp_path: Path) -> None:
    meta = SnapshotMeta(version=7, space_id="raw:x", index_kind="flat", dim=4, exemplar_count=2)
    payload = np.arange(100, dtype=np.uint8)
    path = tmp_path / "index.snapshot"
    write_snapshot(path, meta, payload)
    assert not list(tmp_path.glob("*.tmp"))
    got_meta, got = read_snapshot(path)
    assert got_meta.version == 7 and np.array_equal(got, payload)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError):
        read_snapshot(path)
    assert read_snapshot(tmp_path / "absent") is None


def test_snapshot_writers_never_share_a_temporary_file(tmp_path: Path) -> None:
    """A server and `infer-csv` on one data dir, or two threads, each write their own."""
    path = tmp_path / "index.snapshot"
    others = {tmp_path / "index.snapshot.tmp": b"another writer, half way",
              tmp_path / "index.snapshot.1.2.tmp": b"another process, half way"}
    for other, data in others.items():
        other.write_bytes(data)
    payloads = [np.full(200_000, i, dtype=np.uint8) for i in range(4)]
    failures: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for version in range(5):
                meta = SnapshotMeta(version=version, space_id="raw:x", index_kind="flat", dim=4,
                                    exemplar_count=i)
                write_snapshot(path, meta, payloads[i])
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    meta, data = read_snapshot(path)
    assert np.array_equal(data, payloads[meta.exemplar_count])
    for other, data in others.items():
        assert other.read_bytes() == data  # left alone
    assert sorted(tmp_path.glob("*.tmp")) == sorted(others)


# ----------------------------------------------------------------------- store


def test_store_is_idempotent_all_or_nothing_and_never_reuses_ids(tmp_path: Path) -> None:
    store = GalleryStore(tmp_path / STORE_FILE, "fp", 4)
    vec = unit(np.array([1.0, 2.0, 3.0, 4.0]))
    first = NewExemplar("Carcinus maenas", vec, "a" * 64)
    id1, created, v1 = store.insert_exemplar(first, False)
    assert created and v1 == 1
    assert store.insert_exemplar(first, False) == (id1, False, 1)
    id2, created, _ = store.insert_exemplar(NewExemplar("Patella sp.", vec, "a" * 64), False)
    assert created and id2 != id1  # same photo, other species: another row
    with pytest.raises(KeyError):
        store.delete_exemplars([id2, 999])
    assert store.count() == 2  # nothing removed
    store.delete_exemplars([id2])
    id3, _, _ = store.insert_exemplar(NewExemplar("Patella sp.", vec, "b" * 64), False)
    assert id3 > id2  # AUTOINCREMENT: a removed id is never handed out again
    assert store.integrity() == []
    store.close()
    with pytest.raises(StoreError, match="another model"):
        GalleryStore(tmp_path / STORE_FILE, "other-fingerprint", 4)


# ---------------------------------------------------------------- the gallery


def test_gallery_recovers_from_snapshot_replay_and_rebuild(tmp_path: Path, open_at) -> None:
    species = "Carcinus maenas"
    photos = family(10, 6)
    gallery = open_at(tmp_path)
    assert gallery.recovery == "rebuild"
    ids = [gallery.add_exemplar(item(species, v)).exemplar_id for v in photos[:4]]
    gallery.close()  # clean stop: snapshot
    gallery = open_at(tmp_path)
    assert gallery.recovery == "snapshot"
    assert gallery.size == 4
    # Changes after the snapshot, then no clean close (as after a crash).
    more = [gallery.add_exemplar(item(species, v)).exemplar_id for v in photos[4:]]
    gallery.remove([ids[0]])
    expected = gallery.prototypes()
    gallery.store.close()
    gallery._closed = True

    reopened = open_at(tmp_path)
    assert reopened.recovery == "snapshot+replay"
    assert reopened.size == 5
    assert np.array_equal(reopened.index.exemplar_ids(), np.array(sorted(ids[1:] + more)))
    assert reopened.prototypes().names == expected.names
    assert np.array_equal(reopened.prototypes().vectors, expected.vectors)
    hits = reopened.search(photos[0][None, :], 10)[0]
    assert ids[0] not in [h.exemplar_id for h in hits]
    reopened.close()

    # A corrupt snapshot is not trusted: the index is rebuilt from the store.
    snap = tmp_path / "gallery" / SNAPSHOT_FILE
    snap.write_bytes(snap.read_bytes()[:-10])
    rebuilt = open_at(tmp_path)
    assert rebuilt.recovery == "rebuild" and rebuilt.size == 5
    assert np.array_equal(rebuilt.prototypes().vectors, expected.vectors)


def test_space_id_follows_the_whitening_not_the_weights_file(
        tmp_path: Path, open_at, loaded_demo_model, text_cache) -> None:
    from biolit_id.cli.calibrate import scale_head

    catalog = Catalog.load_default()
    made = whitened_bundle(loaded_demo_model, catalog, text_cache, extra={}, bundle_id="")
    bundle = load_bundle(made.save(tmp_path / "bundle"))
    recalibrated = load_bundle(scale_head(bundle, 1.7).save(tmp_path / "recalibrated"))
    assert recalibrated.bundle_id != bundle.bundle_id  # calibrate rewrote the weights file
    fingerprint = loaded_demo_model.fingerprint
    assert space_id_for(fingerprint, recalibrated) == space_id_for(fingerprint, bundle)
    assert space_id_for(fingerprint, bundle).startswith("whitened:")
    rng = np.random.default_rng(1)
    other_w = dataclasses.replace(bundle, whitening_W=rng.normal(
        size=bundle.whitening_W.shape).astype(np.float32))
    other_mu = dataclasses.replace(bundle, whitening_mu=bundle.whitening_mu + 0.01)
    ids = {space_id_for(fingerprint, b) for b in (bundle, other_w, other_mu)}
    ids.add(space_id_for("another-model", bundle))
    assert len(ids) == 4
    unwhitened = dataclasses.replace(bundle, whitening_mu=None, whitening_W=None)
    assert space_id_for(fingerprint, unwhitened) == space_id_for(fingerprint, None)

    # The FAISS snapshot outlives a recalibration; the prototypes follow the new bundle.
    gallery = open_at(tmp_path / "data", bundle=bundle)
    gallery.add_exemplar(item("Carcinus maenas", family(12, 1)[0]))
    gallery.close()
    again = open_at(tmp_path / "data", bundle=recalibrated)
    assert again.recovery == "snapshot" and again.size == 1
    again.close()
    moved = open_at(tmp_path / "data", bundle=other_w)
    assert moved.recovery == "rebuild" and moved.size == 1


def test_gallery_zero_shot_prototypes_follow_adds_and_removes(tmp_path: Path, open_at) -> None:
    gallery = open_at(tmp_path)
    species = "Patella vulgata"
    row = gallery.prototypes().index()[species]
    text = gallery.prototypes().vectors[row].copy()
    photos = family(11, 3)
    ids = [gallery.add_exemplar(item(species, v)).exemplar_id for v in photos]
    # Adds move the prototype through running sums (the plain mean, no photo read)...
    mean = photos.sum(axis=0) / np.linalg.norm(photos.sum(axis=0))
    running = fuse_prototypes(mean[None], text[None], ZERO_SHOT_ALPHA)[0]
    np.testing.assert_allclose(gallery.prototypes().vectors[row], running, atol=1e-6)
    # ... and a refinement computes the similarity-weighted one from every photo.
    assert gallery.refine() == [species]
    protos = gallery.prototypes()
    expected = fuse_prototypes(weighted_prototype(photos)[None], text[None], ZERO_SHOT_ALPHA)[0]
    assert not np.allclose(expected, running, atol=1e-4)
    np.testing.assert_allclose(protos.vectors[row], expected, atol=1e-6)
    np.testing.assert_allclose(gallery.index.prototype_vector(row), expected, atol=1e-6)
    assert protos.version == gallery.version == 3
    assert gallery.exemplar_counts() == {species: 3}
    # Only that species' row changed; the published set is a new object.
    others = np.delete(np.arange(len(protos.names)), row)
    assert np.array_equal(protos.vectors[others], gallery.builder.base_vectors[others])
    gallery.remove(ids)
    np.testing.assert_allclose(gallery.prototypes().vectors[row], text, atol=0)
    assert gallery.size == 0
    with pytest.raises(UnknownExemplarError):
        gallery.remove(ids[:1])
    with pytest.raises(UnknownSpeciesError, match="AddSpecies"):
        gallery.add_exemplar(item("Nonexistus fictus", photos[0]))


def test_gallery_runtime_species_survive_restart_in_order(tmp_path: Path, open_at) -> None:
    gallery = open_at(tmp_path)
    for name in ("Novus alpha", "Novus beta"):
        gallery.add_species(SpeciesRecord(scientific_name=name, added_at_runtime=True))
    with pytest.raises(SpeciesExistsError):
        gallery.add_species(SpeciesRecord(scientific_name="Novus alpha"))
    gallery.add_exemplar(item("Novus beta", family(12, 1)[0]))
    names = gallery.prototypes().names
    assert names[-2:] == ("Novus alpha", "Novus beta")
    vectors = gallery.prototypes().vectors
    gallery.close()
    again = open_at(tmp_path)
    assert again.catalog.get("Novus beta").added_at_runtime
    assert again.prototypes().names == names
    assert np.array_equal(again.prototypes().vectors, vectors)


def test_gallery_ivf_index_from_configuration(tmp_path: Path, open_at) -> None:
    gallery = open_at(tmp_path)
    photos = np.vstack([family(20 + s, 60, spread=0.3) for s in range(4)])
    names = ["Carcinus maenas", "Patella vulgata", "Mytilus edulis", "Littorina littorea"]
    names = [n for n in names if n in gallery.catalog][:4]
    assert len(names) == 4
    for i, vec in enumerate(photos):
        gallery.add_exemplar(item(names[i // 60], vec), refresh=False)
    gallery.refresh(names)
    gallery.close()
    ivf = open_at(tmp_path, spec="ivf-flat,nlist=4,nprobe=4")
    assert ivf.recovery == "rebuild"  # the flat snapshot does not match the configuration
    assert ivf.index.spec.kind == "ivf-flat"
    hits = ivf.search(photos[70][None, :], 3, species=[names[1]])[0]
    assert hits[0].species == names[1] and hits[0].score > 0.99
    removed = hits[0].exemplar_id
    ivf.remove([removed])
    assert removed not in [h.exemplar_id for h in ivf.search(photos[70][None, :], 5)[0]]
    ivf.close()
    again = open_at(tmp_path, spec="ivf-flat,nlist=4,nprobe=4")
    assert again.recovery == "snapshot" and again.size == 239


def test_runtime_prototypes_follow_the_bundles_recipe(tmp_path: Path, open_at,
                                                      loaded_demo_model, text_cache) -> None:
    """A bundle whose prototypes are class means (train chose them out of fold) gets
    class means for photos added at runtime too; the seed's recipe stays the default."""
    catalog = Catalog.load_default()
    photos = np.vstack([family(31, 5, spread=0.05), family(32, 1)])  # one odd photo
    name = catalog.names()[3]
    got = {}
    for iterations in (0, None):
        extra = {"training": {"prototype_iterations": iterations}} if iterations == 0 else {}
        bundle = whitened_bundle(loaded_demo_model, catalog, text_cache, extra=extra,
                                 bundle_id=f"recipe-{iterations}")
        gallery = open_at(tmp_path / str(iterations), bundle=bundle)
        assert gallery.builder.iterations == (0 if iterations == 0 else 2)
        for vec in photos:
            gallery.add_exemplar(item(name, vec, tag=name))
        gallery.refine([name])
        row = bundle.species.index(name)
        visual = combine_with_prior(bundle.visual_prototypes[row], DEFAULT_PRIOR_WEIGHT,
                                    weighted_prototype(bundle.whiten(photos),
                                                       0 if iterations == 0 else 2), 6)
        expected = fuse_prototypes(visual[None], bundle.text_prototypes[row][None], 0.8)[0]
        got[iterations] = gallery.prototypes().vectors[row]
        np.testing.assert_allclose(got[iterations], expected, atol=1e-5)
    assert not np.allclose(got[0], got[None], atol=1e-4)


def test_gallery_in_a_bundles_whitened_space(tmp_path: Path, open_at, loaded_demo_model,
                                             text_cache) -> None:
    catalog = Catalog.load_default()
    trained = catalog.names()[7]
    bundle = whitened_bundle(loaded_demo_model, catalog, text_cache,
                             extra={"train_counts": {trained: 4}}, bundle_id="test-bundle")
    gallery = open_at(tmp_path, bundle=bundle)
    assert gallery.dim == 64
    assert gallery.space_id == space_id_for(loaded_demo_model.fingerprint, bundle)
    photos = family(30, 3)
    whitened = bundle.whiten(photos)
    for name, weight in ((catalog.names()[2], DEFAULT_PRIOR_WEIGHT), (trained, 4.0)):
        for vec in photos:
            gallery.add_exemplar(item(name, vec, tag=name))
        gallery.refine([name])
        row = bundle.species.index(name)
        visual = combine_with_prior(bundle.visual_prototypes[row], weight,
                                    weighted_prototype(whitened), 3)
        expected = fuse_prototypes(visual[None], bundle.text_prototypes[row][None], 0.8)[0]
        np.testing.assert_allclose(gallery.prototypes().vectors[row], expected, atol=1e-5)
    # A catalog species the bundle lacks gets a row (visual from photos + whitened text).
    outside = catalog.names()[40]
    assert outside not in bundle.species
    gallery.add_exemplar(item(outside, photos[0], tag="outside"))
    protos = gallery.prototypes()
    assert protos.names[-1] == outside and protos.vectors.shape == (13, 64)
    # Exemplars are searched in the same whitened space: a photo finds itself at cosine 1.
    hit = gallery.search(photos[:1], 1, species=[outside])[0][0]
    assert hit.species == outside and hit.score > 0.999
    # The head is untouched and the scorer accepts the grown PrototypeSet.
    scores = SeedCascadeScorer(bundle).score(photos[:1], protos)
    assert scores.p_proto.shape == (1, 13) and scores.p_common.shape == (1, 6)
