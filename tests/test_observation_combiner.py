"""The observation combiner (decision/observations.py): pure numpy over photo distributions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from biolit_id.server.decision.observations import (
    CombinerParams,
    combine,
    combine_batch,
    photo_weight,
    pooled_embedding,
    temper_pooled,
)


def dist(*values: float) -> np.ndarray:
    p = np.asarray(values, dtype=np.float64)
    return p / p.sum()


def peaked(index: int, top: float, species: int = 12) -> np.ndarray:
    p = np.full(species, (1.0 - top) / (species - 1))
    p[index] = top
    return p


A_SURE = peaked(0, 0.90)
A_WEAK = dist(0.50, 0.30, 0.10, 0.10)
C_SURE = peaked(2, 0.99)


def test_one_photo_without_prior_is_the_photo() -> None:
    out = combine(A_WEAK[None], CombinerParams(outlier=0.2, rho=0.7))
    np.testing.assert_allclose(out.probs[0], A_WEAK)
    assert out.outlier_probability[0, 0] == 0.0
    assert out.kept.all()


def test_independent_photos_multiply() -> None:
    params = CombinerParams(rho=0.0, outlier=0.0, trim=False)
    out = combine(np.stack([A_WEAK, A_WEAK, A_WEAK]), params)
    expected = A_WEAK**3 / (A_WEAK**3).sum()
    np.testing.assert_allclose(out.probs[0], expected)
    assert out.probs[0, 0] > A_WEAK[0]


def test_correlation_discounts_agreeing_photos() -> None:
    photos = np.stack([A_WEAK] * 3)
    sure = combine(photos, CombinerParams(rho=0.0, outlier=0.0)).probs[0, 0]
    shy = combine(photos, CombinerParams(rho=0.5, outlier=0.0)).probs[0, 0]
    same = combine(photos, CombinerParams(rho=1.0, outlier=0.0)).probs[0, 0]
    assert sure > shy > same
    assert same == pytest.approx(A_WEAK[0])  # rho = 1: three copies of one photo
    assert photo_weight(3, 0.5) == pytest.approx(0.5)
    assert photo_weight(1, 0.9) == pytest.approx(1.0)


def test_an_outlier_photo_does_not_flip_the_others() -> None:
    params = CombinerParams(rho=0.2, outlier=0.05)
    two = combine(np.stack([A_SURE, A_SURE]), params)
    three = combine(np.stack([A_SURE, A_SURE, C_SURE]), params)
    assert three.probs[0].argmax() == 0
    assert three.outlier_probability[0, 2] > 0.5 > three.outlier_probability[0, 0]
    assert not three.kept[0, 2] and three.kept[0, :2].all()
    # The stray photo left out, the answer is the two photos' own.
    np.testing.assert_allclose(three.probs[0], two.probs[0])
    # Without the trim it still does not flip, and the mixture bounds its pull.
    untrimmed = combine(np.stack([A_SURE, A_SURE, C_SURE]), params.replace(trim=False))
    assert untrimmed.probs[0].argmax() == 0
    plain = combine(np.stack([A_SURE, A_SURE, C_SURE]),
                    params.replace(trim=False, outlier=0.0)).probs[0]
    assert untrimmed.probs[0, 0] > plain[0]


def test_two_disagreeing_photos_are_never_trimmed() -> None:
    out = combine(np.stack([A_SURE, C_SURE]), CombinerParams(outlier=0.05))
    assert out.kept.all()  # no majority to decide which one is off-target
    assert out.probs[0, 0] < 0.9 and out.probs[0, 2] < 0.9
    assert out.outlier_probability[0].min() > 0.1  # either may be the stray one


def test_prior_moves_the_ranking_and_weight_zero_does_not() -> None:
    look_alikes = dist(0.55, 0.45, 0.0001, 0.0001)
    factor = np.array([0.05, 3.0, 1.0, 1.0])
    moved = combine(look_alikes[None], CombinerParams(prior_weight=1.0), factor)
    assert moved.probs[0].argmax() == 1
    np.testing.assert_allclose(moved.photos_only[0], look_alikes)
    still = combine(look_alikes[None], CombinerParams(prior_weight=0.0), factor)
    np.testing.assert_allclose(still.probs[0], look_alikes)


def test_restriction_keeps_excluded_species_at_zero() -> None:
    allowed = np.array([True, True, False, True])  # 4 species
    photos = np.stack([dist(0.6, 0.3, 0.0, 0.1), dist(0.2, 0.7, 0.0, 0.1),
                       dist(0.5, 0.4, 0.0, 0.1)])
    out = combine(photos, CombinerParams(outlier=0.3), allowed=allowed)
    assert out.probs[0, 2] == 0.0
    assert out.probs[0].sum() == pytest.approx(1.0)


def test_batch_matches_one_at_a_time() -> None:
    params = CombinerParams(rho=0.3, outlier=0.1)
    weak = np.concatenate([A_WEAK, np.zeros(8)])
    obs = [np.stack([A_SURE, C_SURE, weak]), np.stack([weak]), np.stack([C_SURE, C_SURE])]
    padded = np.zeros((3, 3, 12))
    mask = np.zeros((3, 3), dtype=bool)
    for i, photos in enumerate(obs):
        padded[i, : len(photos)] = photos
        mask[i, : len(photos)] = True
    batch = combine_batch(padded, mask, params)
    for i, photos in enumerate(obs):
        np.testing.assert_allclose(batch.probs[i], combine(photos, params).probs[0])


def test_pooled_embedding_and_tempering() -> None:
    rows = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    pooled = pooled_embedding(rows)
    assert np.linalg.norm(pooled) == pytest.approx(1.0)
    assert pooled[0] == pytest.approx(pooled[1])
    p = A_WEAK[None]
    sharper, _ = temper_pooled(p, np.array([3]), CombinerParams(pooled_gamma=0.5))
    same, _ = temper_pooled(p, np.array([1]), CombinerParams(pooled_gamma=0.5))
    assert sharper[0, 0] > A_WEAK[0]
    np.testing.assert_allclose(same[0], A_WEAK)


def test_params_round_trip_and_digest(tmp_path: Path) -> None:
    params = CombinerParams(rho=0.25, outlier=0.02, prior_weight=0.7, fitted={"n": 3})
    params.save(tmp_path)
    loaded = CombinerParams.load(tmp_path)
    assert loaded == params and loaded.fitted == {"n": 3}
    assert loaded.digest() == params.digest()
    assert params.replace(rho=0.3).digest() != params.digest()
    assert CombinerParams.load(tmp_path / "none") == CombinerParams()
    with pytest.raises(ValueError, match="combiner method"):
        CombinerParams(method="vote")
