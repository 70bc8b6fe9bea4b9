"""The gallery at scale: running sums kept with the photos, sweeps that repair only real damage.

Real milvus-lite and real SQLite/FAISS, synthetic vectors (no model), the
benchmark's own gallery (``tools/bench/gallery_scale.py``). Speed is the
benchmark's business; these check the bookkeeping that makes adds O(1).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from biolit_id.cli.bench.gallery_scale import open_synthetic_gallery, synthetic_items
from biolit_id.cli.bench.vectors import synthetic_vectors
from biolit_id.index.faiss import gallery as faiss_gallery
from biolit_id.index.milvus.rows import exemplar_id_for
from biolit_id.index.prototypes import SpeciesSums
from conftest import wait_for

DIM = 64



def test_a_healthy_10k_milvus_gallery_is_never_repaired_and_a_real_fault_is(tmp_path, caplog):
    gallery = open_synthetic_gallery("milvus-lite:{dir}/g.db?poll=0.2&sweep=1", tmp_path, DIM)
    try:
        species = list(gallery.prototypes().names[:3])
        vectors, _ = synthetic_vectors(10_000, DIM, seed=3)
        for start in range(0, len(vectors), 2000):
            gallery.add_many(synthetic_items(vectors[start:start + 2000], start, species))
        assert gallery.index.count() == gallery.size == 10_000
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="biolit_id.index.milvus.gallery"):
            sweeps = gallery.sweeps
            assert wait_for(lambda: gallery.sweeps >= sweeps + 3, timeout=60)
        assert gallery.repairs == 0
        assert not [r for r in caplog.records if "disagree" in r.getMessage()]

        # A photo stored without its species row (a replica killed mid-add): repaired,
        # once it has outlived a sweep, from the photos themselves.
        vec = synthetic_vectors(1, DIM, seed=4)[0][0]
        item = synthetic_items(vec[None, :], 10_000, species[:1])[0]
        eid = exemplar_id_for(item.species, item.content_sha256)
        gallery.index.insert([gallery.index.exemplar_row(
            eid, item.species, vec, vec, content_sha256=item.content_sha256, added_at=0.0)])
        assert wait_for(lambda: gallery.repairs == 1, timeout=60)
        assert gallery.exemplar_counts()[species[0]] == gallery.index.count([species[0]])
        row = gallery.index.species_row(species[0])
        ids, raw = gallery.index.embeddings_for(species[0])
        np.testing.assert_allclose(row.sums(DIM).visual(),
                                   SpeciesSums.refined(raw).visual(), atol=1e-5)
        assert row.refined_count == len(ids)
    finally:
        gallery.close()


def test_faiss_sums_are_written_with_the_photos_and_survive_a_restart(tmp_path, caplog):
    gallery = open_synthetic_gallery("faiss", tmp_path, DIM)
    species = list(gallery.prototypes().names[:2])
    vectors, _ = synthetic_vectors(300, DIM, seed=5)
    items = synthetic_items(vectors, 0, species)
    for item in items[:100]:
        gallery.add_exemplar(item, refresh=False)
    gallery.add_many(items[100:])
    gallery.refresh(species)
    outcome = gallery.remove([gallery.find(species[0], items[0].content_sha256)])
    assert outcome.removed_count == 1
    stored = gallery.store.species_sums(gallery.space_id)
    assert {n: s.count for n, s in stored.items()} == gallery.store.counts() == {
        species[0]: 149, species[1]: 150}
    kept = vectors[2:300:2]  # species[0]'s photos but the removed one
    np.testing.assert_allclose(stored[species[0]].visual(),
                               SpeciesSums.empty(DIM).plus(kept).visual(), atol=1e-6)
    before = gallery.prototypes().vectors.copy()
    gallery.close()

    with caplog.at_level(logging.INFO, logger="biolit_id.index.faiss.gallery"):
        again = open_synthetic_gallery("faiss", tmp_path, DIM)
    assert not [r for r in caplog.records if "recomputing" in r.getMessage()]
    np.testing.assert_allclose(again.prototypes().vectors, before, atol=1e-6)
    # A store from before the sums existed: recomputed once, from the photos.
    again.store.write_species_sums(again.space_id, {species[1]: SpeciesSums.empty(DIM)})
    again.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="biolit_id.index.faiss.gallery"):
        third = open_synthetic_gallery("faiss", tmp_path, DIM)
    assert [r for r in caplog.records if "recomputing" in r.getMessage()]
    assert third.store.species_sums(third.space_id)[species[1]].refined_count == 150
    third.close()


def test_ivf_training_reads_only_the_sample(tmp_path, monkeypatch):
    gallery = open_synthetic_gallery("faiss", tmp_path, DIM)
    try:
        species = list(gallery.prototypes().names[:3])
        vectors, _ = synthetic_vectors(2000, DIM, seed=6)
        gallery.add_many(synthetic_items(vectors, 0, species))
        sample = gallery.store.sample_ids(300, seed=1)
        assert len(sample) == len(set(sample.tolist())) == 300
        assert np.all(np.diff(sample) > 0) and set(sample) <= set(gallery.store.all_ids())
        monkeypatch.setattr(faiss_gallery, "TRAINING_SAMPLE", 300)
        drawn = []
        real = gallery.store.embeddings_by_ids
        monkeypatch.setattr(gallery.store, "embeddings_by_ids",
                            lambda ids: drawn.extend(ids) or real(ids))
        training = gallery._training_sample()
        assert len(drawn) == 300 and len(training) == 300 + len(gallery.prototypes().names)
        assert not np.allclose(training[-300:], vectors[:300])  # a draw, not the first rows
    finally:
        gallery.close()


@pytest.mark.parametrize("n", [1, 2, 7])
def test_sums_start_from_a_refinement_and_move_like_a_mean(n):
    photos = synthetic_vectors(n + 3, DIM, seed=n)[0]
    refined = SpeciesSums.refined(photos[:n])
    assert refined.count == refined.refined_count == n and refined.drift() == 0
    moved = refined.plus(photos[n:])
    assert moved.count == n + 3 and moved.drift() == pytest.approx(3 / (n + 3))
    back = moved.plus(photos[n:], sign=-1)
    np.testing.assert_allclose(back.visual(), refined.visual(), atol=1e-6)
    assert SpeciesSums.refined(photos[:1]).plus(photos[:1], sign=-1).visual() is None
