"""The quality machinery on data whose answer is known: cross-fitting, family choice, risk control.

Each test builds scores where the right outcome is decided by construction
(an informative or a useless head, a group that errs more), so a change that
leaks a fold's own labels, ignores the head or loosens a bound fails here.
"""

from __future__ import annotations

import numpy as np

from biolit_id.cli.training.crossfit import (
    FAMILIES,
    OutOfFold,
    calibration_rows,
    choose_family,
    nested_probabilities,
    stratified_folds,
)
from biolit_id.cli.training.risk_control import (
    answered_share,
    certified_cut,
    clopper_pearson_lower,
    clopper_pearson_upper,
    cuts_at_coverage,
    flatter_prior_weights,
    group_cuts,
    within_outside_target,
)
from biolit_id.server.decision.rules import route_fused
from biolit_id.server.decision.types import SpeciesGroup, Thresholds, photo_groups

S = 12


def _oof(head_quality: float, seed: int = 0, n_per: int = 40,
         lda_quality: float = 0.0) -> OutOfFold:
    """Cosines that point weakly at the truth; an MLP head that is ``head_quality`` good,
    an LDA head ``lda_quality`` good."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(S), n_per)
    cos = rng.normal(0, 0.1, (len(y), S))
    cos[np.arange(len(y)), y] += 0.12
    head, lda = rng.normal(0, 1.0, (2, len(y), S))
    head[np.arange(len(y)), y] += head_quality
    lda[np.arange(len(y)), y] += lda_quality
    return OutOfFold(cos=cos, head_logits=head, head_ids=np.arange(S),
                     log_prior=np.full(S, -np.log(S)), baselines={}, y=y,
                     fold=stratified_folds(y, 5, seed), lda_logits=lda)


def test_folds_and_calibration_rows_are_stratified_and_disjoint():
    y = np.repeat(np.arange(6), [40, 20, 10, 5, 3, 1])
    fold = stratified_folds(y, 5, 0)
    for c in range(3):
        assert np.bincount(fold[y == c], minlength=5).min() >= (y == c).sum() // 5
    kept = calibration_rows(y, seed=0)
    assert kept[y == 0].sum() == 8 and kept[y == 3].sum() == 1
    assert not kept[y == 4].any() and not kept[y == 5].any()  # too few: all kept for fitting


def test_a_folds_probabilities_do_not_depend_on_its_own_labels():
    oof = _oof(head_quality=2.0)
    fused = next(f for f in FAMILIES if f.name == "fused")
    before = nested_probabilities(fused, oof)
    fold0 = oof.fold == 0
    oof.y = oof.y.copy()
    oof.y[fold0] = np.random.default_rng(1).permutation(oof.y[fold0])
    after = nested_probabilities(fused, oof)
    np.testing.assert_allclose(after[fold0], before[fold0])  # fitted without fold 0
    assert not np.allclose(after[~fold0], before[~fold0])  # the others did see fold 0


def test_an_informative_head_is_chosen_and_a_useless_one_is_not():
    rare = np.arange(S) >= 6
    good = choose_family(_oof(head_quality=4.0), rare)
    assert good.name in {"head", "head+prior", "fused", "fused+prior"}
    useless = choose_family(_oof(head_quality=0.0), rare)
    assert useless.name in {"cosine", "cosine+prior"}
    assert useless.weights.head == 0.0
    by_name = {row["family"]: row for row in good.table}
    assert by_name[good.name]["balanced_accuracy"] >= by_name["cosine"]["balanced_accuracy"]
    assert good.head == "mlp" and by_name[good.name]["weights"] == good.weights.to_json()


def test_lda_is_served_when_it_wins_out_of_fold():
    choice = choose_family(_oof(head_quality=0.0, lda_quality=4.0), np.arange(S) >= 6)
    assert choice.name in {"lda", "cosine+lda"} and choice.head == "lda"
    assert choice.weights.head > 0
    assert {row["family"] for row in choice.table if row["served"]} >= {
        "cosine", "head", "fused", "lda", "cosine+lda"}


def test_the_certified_cut_bounds_the_error_and_stops_at_the_first_failure():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 4000)
    wrong = rng.uniform(0, 1, 4000) > conf  # error rate 1 - conf: calibrated
    cut = certified_cut(conf, wrong, max_risk=0.2)
    passed = conf >= cut
    assert clopper_pearson_upper(int(wrong[passed].sum()), int(passed.sum())) <= 0.2
    assert 0.6 < cut < 0.9  # calibrated scores: answers above ~0.65 err < 20 % on average
    assert certified_cut(conf, np.ones_like(wrong), max_risk=0.2) == np.inf


def test_a_group_that_errs_more_gets_a_stricter_cut():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0, 1, 6000)
    groups = np.where(np.arange(6000) % 3 == 0, SpeciesGroup.RARE, SpeciesGroup.COMMON)
    wrong = rng.uniform(0, 1, 6000) > np.where(groups == SpeciesGroup.RARE, conf * 0.9, conf)
    found = group_cuts(conf, wrong, groups, {"common": 0.15, "rare": 0.2, "runtime": 0.2})
    assert np.isfinite(found.cuts["rare"]) and found.cuts["rare"] > found.cuts["common"]
    assert found.borrowed == ("runtime",) and found.cuts["runtime"] == found.cuts["rare"]
    flat = flatter_prior_weights(np.repeat([0, 1], [90, 10]), 1.0)
    assert np.isclose(flat[:90].sum(), flat[90:].sum())
    found, level = cuts_at_coverage(conf, wrong, groups, 0.5)
    assert 0.0 < level < 1.0
    cut = np.array([found.cuts["common"], found.cuts["rare"], found.cuts["runtime"]])[groups]
    assert (conf >= cut).mean() >= 0.5
    # The share is met by its lower bound: on 300 photos that needs a margin over the point.
    few = slice(0, 300)
    point, _ = cuts_at_coverage(conf[few], wrong[few], groups[few], 0.5, coverage_delta=None)
    reached = answered_share(conf[few], groups[few], point)
    bound, _ = cuts_at_coverage(conf[few], wrong[few], groups[few], reached)
    share = answered_share(conf[few], groups[few], bound)
    assert share > reached and clopper_pearson_lower(round(share * 300), 300) >= reached


def test_a_photo_is_cut_by_the_group_where_its_mass_lies():
    species_group = np.array([SpeciesGroup.COMMON, SpeciesGroup.RARE, SpeciesGroup.RARE,
                              SpeciesGroup.RUNTIME])
    dist = np.array([[0.7, 0.1, 0.1, 0.1],    # common
                     [0.3, 0.6, 0.05, 0.05],  # rare mass 0.65
                     [0.1, 0.2, 0.1, 0.6]])   # runtime mass 0.6
    assert photo_groups(dist, species_group).tolist() == [0, 1, 2]
    routed = route_fused(dist, Thresholds(answer=0.5, answer_rare=0.65, answer_runtime=0.9),
                         species_group)
    assert routed.species.tolist() == [0, -1, -1]
    same = route_fused(dist, Thresholds(answer=0.5), species_group)
    assert same.species.tolist() == [0, 1, 3]


def test_the_lda_head_is_the_discriminant_in_the_whitening_and_loads_as_a_head():
    from biolit_id.cli.training.features import fit_whitening
    from biolit_id.cli.training.lda import LDA_HEAD, lda_discriminants, lda_head_state
    from biolit_id.server.decision.head import Head

    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(5), 30)
    x = rng.normal(0, 1, (len(y), 24)) + rng.normal(0, 2, (5, 24))[y]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    mu, w, _ = fit_whitening(x, 16)
    classes = [1, 2, 4]  # a head over some species: rows of the others are left out
    head = Head(lda_head_state(x, y, classes, mu, w), 24, len(classes), LDA_HEAD)
    keep = np.isin(y, classes)
    z = (x - mu.astype(np.float64)) @ w.astype(np.float64)
    a, bias = lda_discriminants(z[keep], np.searchsorted(classes, y[keep]), 3, 0.1)
    np.testing.assert_allclose(head.logits(x), z @ a + bias, rtol=1e-3, atol=1e-2)
    assert (head.logits(x[keep]).argmax(1) == np.searchsorted(classes, y[keep])).mean() > 0.9


def test_out_of_catalog_photos_are_kept_under_the_rare_target():
    """Photos of species the catalog lacks look confident (here as much as the right
    ones): the cuts are raised until at most the rare target of them would be answered."""
    rng = np.random.default_rng(4)
    conf = rng.uniform(0, 1, 3000)
    groups = np.where(np.arange(3000) % 3 == 0, SpeciesGroup.RARE, SpeciesGroup.COMMON)
    wrong = rng.uniform(0, 1, 3000) > conf
    outside = rng.uniform(0.2, 1.0, 1000)
    outside_groups = np.full(1000, SpeciesGroup.RARE)
    targets = {"common": 0.3, "rare": 0.3, "runtime": 0.3}
    plain = group_cuts(conf, wrong, groups, targets)
    assert answered_share(outside, outside_groups, plain) > 0.3
    kept = within_outside_target(conf, wrong, groups, outside, outside_groups, targets, 0.3)
    assert answered_share(outside, outside_groups, kept) <= 0.3
    assert kept.cuts["rare"] > plain.cuts["rare"] and kept.cuts["common"] >= plain.cuts["common"]
    looser = group_cuts(conf, wrong, groups, dict.fromkeys(targets, kept.risk["rare"] + 0.005))
    assert answered_share(outside, outside_groups, looser) > 0.3  # as little as is enough
    easy = within_outside_target(conf, wrong, groups, outside, outside_groups, targets, 0.9)
    assert easy.cuts == plain.cuts
