"""The Milvus gallery index on milvus-lite: same answers as FAISS, measured recall, rows, pages.

Real milvus-lite (the embedded Milvus, installed by the ``milvus`` extra) and
real FAISS; the vectors are the gallery benchmark's synthetic species-like
clusters (``tools/bench_vectors.synthetic_vectors``), 100 "species" of ~30.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from biolit_id.cli.bench.vectors import exact_neighbours, recall_at_k, synthetic_vectors
from biolit_id.index.faiss.vector_index import IndexSpec, VectorIndex
from biolit_id.index.milvus.collections import MilvusIndex
from biolit_id.index.milvus.errors import MilvusConfigError, MilvusGalleryError, milvus_errors
from biolit_id.index.milvus.rows import MAX_ID, exemplar_id_for
from biolit_id.index.milvus.target import parse_target
from biolit_id.index.milvus.thumbnail import THUMBNAIL_MAX_CHARS, decode_thumbnail, encode_thumbnail
from conftest import photo_bytes

DIM = 256
N = 3000
K = 10
SPECIES = [f"Species {i:03d}" for i in range(100)]


@pytest.fixture(scope="module")
def data():
    base, centres = synthetic_vectors(N, DIM, seed=0, per_cluster=30)
    queries, _ = synthetic_vectors(200, DIM, seed=1, centres=centres)
    ids = np.arange(1, N + 1, dtype=np.int64)
    # species of a row = its nearest centre, like photos of one species
    species = [SPECIES[i] for i in np.argmax(base @ centres.T, axis=1)]
    return base, queries, ids, species


def open_index(path, options: str = "", meta: dict | None = None) -> MilvusIndex:
    target = parse_target(f"milvus-lite:{path}?{options}" if options else f"milvus-lite:{path}")
    return MilvusIndex(target, dim=DIM, raw_dim=DIM,
                       meta=meta or {"model_fingerprint": "test", "space_id": "raw:test"})


def fill(index: MilvusIndex, base, ids, species) -> None:
    rows = [index.exemplar_row(int(i), s, v, v, content_sha256=f"{int(i):064x}",
                               source_uri=f"test://{int(i)}", added_at=float(i))
            for i, v, s in zip(ids, base, species, strict=True)]
    for start in range(0, len(rows), 1000):
        index.insert(rows[start:start + 1000])


@pytest.fixture(scope="module")
def flat_pair(data, tmp_path_factory):
    base, _, ids, species = data
    milvus = open_index(tmp_path_factory.mktemp("flat") / "g.db")
    fill(milvus, base, ids, species)
    faiss_index = VectorIndex.build(IndexSpec(kind="flat"), DIM)
    faiss_index.add(ids, base)
    yield milvus, faiss_index
    milvus.close()


def assert_same_ranking(ids_a, scores_a, ids_b, scores_b) -> None:
    """Identical top-k; positions whose scores tie within float error may swap."""
    np.testing.assert_allclose(scores_a, scores_b, atol=2e-6)
    for row_a, row_b, s in zip(ids_a, ids_b, scores_a, strict=True):
        assert set(row_a) == set(row_b)
        tie = np.zeros(len(s), bool)
        tie[:-1] |= np.abs(np.diff(s)) < 2e-6
        tie[1:] |= np.abs(np.diff(s)) < 2e-6
        assert np.array_equal(row_a[~tie], row_b[~tie])


def test_flat_milvus_returns_the_same_top10_as_faiss_exact(data, flat_pair):
    _, queries, ids, species = data
    milvus, faiss_index = flat_pair
    f_scores, f_ids = faiss_index.search_exemplars(queries, K)
    m_scores, m_ids, _ = milvus.search_exemplars(queries, K)
    assert milvus.exemplar_count == N
    assert (m_ids >= 1).all()
    assert_same_ranking(m_ids, m_scores, f_ids, f_scores)
    # and with a species filter (FAISS: an id selector over those species' ids)
    wanted = SPECIES[:7]
    only = ids[np.isin(species, wanted)]
    f_scores, f_ids = faiss_index.search_exemplars(queries, K, only_ids=only)
    m_scores, m_ids, hits = milvus.search_exemplars(queries, K, species=wanted,
                                                    output_fields=["species"])
    assert {h["species"] for row in hits for h in row} <= set(wanted)
    assert_same_ranking(m_ids, m_scores, f_ids, f_scores)


@pytest.mark.parametrize("kind", ["clustered", "uniform"])
def test_ivf_recall_is_measured_and_exhaustive_probing_is_exact(kind, data, tmp_path):
    """Approximate settings and their recall@10 (printed; docs/deploy.md quotes them).

    ``uniform``: random directions, no neighbourhood structure, the worst case.
    """
    base, queries, ids, species = data
    if kind == "uniform":
        base, _ = synthetic_vectors(N, DIM, kind="uniform", seed=2)
        queries, _ = synthetic_vectors(100, DIM, kind="uniform", seed=3)
    queries = queries[:100]
    truth = ids[exact_neighbours(base, queries, K)]
    nlist = 64
    index = open_index(tmp_path / "ivf.db", f"index=ivf-flat&nlist={nlist}&nprobe=8")
    try:
        fill(index, base, ids, species)
        index.flush(reload=True)
        recall = {}
        for nprobe in (1, 4, 16, nlist):
            _, found, _ = index.search_exemplars(queries, K, search_params={"nprobe": nprobe})
            recall[nprobe] = recall_at_k(found, truth)
        print(f"\nmilvus-lite IVF_FLAT nlist=64, {kind}: recall@10 by nprobe", json.dumps(recall))
        assert recall[1] < 1.0  # the index is in use: one list is not enough
        values = list(recall.values())
        assert all(a <= b + 1e-9 for a, b in itertools.pairwise(values))
        assert recall[nlist] == 1.0
    finally:
        index.close()


def test_hnsw_recall_grows_with_ef(data, tmp_path):
    base, queries, ids, species = data
    queries = queries[:100]
    truth = ids[exact_neighbours(base, queries, K)]
    index = open_index(tmp_path / "hnsw.db", "index=hnsw&m=8&ef_construction=64&ef=16")
    try:
        fill(index, base, ids, species)
        index.flush(reload=True)
        recall = {}
        for ef in (10, 32, 128):
            _, found, _ = index.search_exemplars(queries, K, search_params={"ef": ef})
            recall[ef] = recall_at_k(found, truth)
        print("\nmilvus-lite HNSW M=8 efConstruction=64 recall@10 by ef:", json.dumps(recall))
        assert recall[10] <= recall[32] + 1e-9 <= recall[128] + 2e-9
        assert recall[128] >= 0.9
    finally:
        index.close()


def test_rows_keep_metadata_thumbnails_and_raw_embeddings(tmp_path):
    index = open_index(tmp_path / "rows.db")
    try:
        rng = np.random.default_rng(3)
        raw = rng.standard_normal(DIM).astype(np.float32)
        thumb = photo_bytes(7)
        eid = exemplar_id_for("Carcinus maenas", "ab" * 32)
        index.insert([index.exemplar_row(
            eid, "Carcinus maenas", raw / np.linalg.norm(raw), raw, content_sha256="ab" * 32,
            source_uri="https://x/1.jpg", observation_id="obs-1", license="CC-BY",
            contributor="Ana", added_at=12.5, thumbnail=thumb)])
        got = index.get([eid], ["species", "raw", "thumbnail", "license", "added_at"])[eid]
        assert np.array_equal(np.asarray(got["raw"], np.float32), raw)  # bit-exact
        assert decode_thumbnail(got["thumbnail"]) == thumb
        assert (got["species"], got["license"], got["added_at"]) == ("Carcinus maenas",
                                                                     "CC-BY", 12.5)
        assert index.remove([eid]) == 1
        assert index.get([eid], ["species"]) == {}
        assert index.exemplar_count == 0
    finally:
        index.close()


def test_oversized_thumbnails_are_reencoded_to_fit_a_varchar():
    big = photo_bytes(1, size=(256, 256))
    noisy = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(noisy).save(out, format="PNG")  # ~200 KB: far over 64 KiB of base64
    text = encode_thumbnail(out.getvalue())
    assert len(text) <= THUMBNAIL_MAX_CHARS
    assert Image.open(io.BytesIO(decode_thumbnail(text))).format == "JPEG"
    assert decode_thumbnail(encode_thumbnail(big)) == big  # a normal one is kept as is


def test_pages_visit_every_id_once_in_order(tmp_path):
    """Small imported ids and 62-bit hash ids mixed; species-filtered pages too."""
    index = open_index(tmp_path / "pages.db")
    try:
        ids = list(range(1, 41)) + [exemplar_id_for("S", f"{i:064x}") for i in range(60)]
        species = ["A" if i % 3 else "B" for i in range(len(ids))]
        vec = np.eye(DIM, dtype=np.float32)[0]
        index.insert([index.exemplar_row(i, s, vec, vec, content_sha256=f"{n:064x}",
                                         added_at=0.0)
                      for n, (i, s) in enumerate(zip(ids, species, strict=True))])
        for wanted, filt in ((sorted(ids), None),
                             (sorted(i for i, s in zip(ids, species, strict=True) if s == "B"),
                              ["B"])):
            seen, after = [], 0
            while True:
                page = index.page_ids(after, 7, filt)
                if not page:
                    break
                seen += page
                after = page[-1]
            assert seen == wanted
        assert max(ids) <= MAX_ID
    finally:
        index.close()


def test_a_collection_refuses_another_model_or_space(tmp_path):
    path = tmp_path / "meta.db"
    index = open_index(path, meta={"model_fingerprint": "m1", "space_id": "raw:m1"})
    index.close()
    with pytest.raises(MilvusConfigError, match="space_id"):
        open_index(path, meta={"model_fingerprint": "m1", "space_id": "bundle:b2"})
    with pytest.raises(MilvusConfigError, match="model_fingerprint"):
        open_index(path, meta={"model_fingerprint": "m2", "space_id": "raw:m1"})


def test_a_collection_labelled_with_the_old_bundle_space_id_is_relabelled(tmp_path):
    path = tmp_path / "legacy.db"
    open_index(path, meta={"model_fingerprint": "m1", "space_id": "bundle:b1"}).close()
    with pytest.raises(MilvusConfigError, match="space_id"):  # another bundle: refused
        open_index(path, meta={"model_fingerprint": "m1", "space_id": "whitened:w2",
                               "legacy_space_id": "bundle:b2"})
    index = open_index(path, meta={"model_fingerprint": "m1", "space_id": "whitened:w1",
                                   "legacy_space_id": "bundle:b1"})
    assert index.meta["space_id"] == "whitened:w1"
    index.close()
    index = open_index(path, meta={"model_fingerprint": "m1", "space_id": "whitened:w1"})
    assert index.meta["space_id"] == "whitened:w1"
    index.close()


@pytest.mark.parametrize("text, message", [
    ("milvus-lite:", "needs a path"),
    ("milvus://host:19530", "HOST:PORT/COLLECTION"),
    ("milvus://host:19530/a/b", "HOST:PORT/COLLECTION"),
    ("milvus://host/1abc", "collection name"),
    ("milvus-lite:./x.db?index=annoy", "choose one of"),
    ("milvus-lite:./x.db?nprobe=zero", "integer"),
    ("milvus-lite:./x.db?colour=red", "unknown Milvus gallery option"),
    ("milvus-lite:./x.db?consistency=sometimes", "consistency"),
    ("faiss", "not a Milvus gallery"),
])
def test_bad_targets_say_what_is_wrong(text, message):
    with pytest.raises(MilvusConfigError, match=message):
        parse_target(text)


def test_targets_parse_options():
    t = parse_target("milvus://db.internal:19531/gallery_v2?index=hnsw&m=32&ef=96&poll=0.5"
                     "&consistency=bounded")
    assert (t.uri, t.collection, t.lite) == ("http://db.internal:19531", "gallery_v2", False)
    assert (t.index, t.m, t.ef, t.poll_seconds, t.consistency) == ("hnsw", 32, 96, 0.5,
                                                                    "Bounded")
    assert t.build_params(256) == {"M": 32, "efConstruction": 200}
    lite = parse_target("milvus-lite:/tmp/somewhere")
    assert lite.uri == "/tmp/somewhere/gallery.db" and lite.collection == "biolit_gallery"
    assert parse_target("milvus-lite:/tmp/g.db?index=ivf-pq&pq_m=32").build_params(256) == {
        "nlist": 1024, "m": 32, "nbits": 8}


def test_milvus_failures_become_gallery_errors_and_ours_pass_through(tmp_path):
    """One mapping for every call: pymilvus' errors become MilvusGalleryError (UNAVAILABLE),
    the gallery's own errors keep their type and message."""
    index = open_index(tmp_path / "errors.db")
    try:
        with pytest.raises(MilvusGalleryError, match=r"^Milvus query failed: "):
            index.query("no_such_field == 1", ["id"], 1)
        with pytest.raises(MilvusGalleryError, match=r"^Milvus upsert failed: "):
            index.insert([{"id": 1, "species": "S"}])  # a row without its vector
        assert index.exemplar_count == 0
    finally:
        index.close()
    with pytest.raises(MilvusConfigError, match="pq_m"), milvus_errors("anything"):
        parse_target("milvus-lite:/tmp/x.db?index=ivf-pq&pq_m=7").build_params(DIM)
    with pytest.raises(MilvusGalleryError, match=r"^Milvus flush failed: closed"):
        @milvus_errors("flush")
        def failing() -> None:
            raise RuntimeError("closed")

        failing()
