"""Cuts whose error among answers is bounded per photo group, not only on average.

A false record of a rare species costs more than a rejected photo, so the
answer cut is set per group (where the photo's probability lies: common, rare,
added at runtime) with a Learn-then-Test fixed sequence: cuts are scanned from
high to low and the lowest one kept before the first whose one-sided
Clopper–Pearson upper bound on the group's error exceeds its target. Rule and
measured numbers: docs/quality.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from biolit_id.server.decision.types import SpeciesGroup, Thresholds

DELTA = 0.1  # the bound holds with probability 1 - DELTA
MIN_ANSWERS = 50  # a cut is only tested once this many calibration photos pass it (power)
CUT_GRID = np.round(np.arange(0.995, 0.019, -0.005), 3)
RISK_GRID = np.round(np.arange(0.02, 0.991, 0.005), 3)
# Coverage is promised for photos flatter than the training prior (volunteers' finds are
# less dominated by the common species than curated training sets): docs/quality.md.
FLATTEN = 0.5
COVERAGE_DELTA = 0.1  # --coverage is met by a lower bound at this level (cuts_at_coverage)
GROUP_NAMES = tuple(g.name.lower() for g in SpeciesGroup)


def clopper_pearson_upper(errors: int, n: int, delta: float = DELTA) -> float:
    """One-sided upper bound of a binomial rate: ``errors`` wrong of ``n``."""
    if n == 0 or errors >= n:
        return 1.0
    return float(stats.beta.ppf(1 - delta, errors + 1, n - errors))


def clopper_pearson_lower(successes: int, n: int, delta: float = DELTA) -> float:
    """One-sided lower bound of a binomial rate: ``successes`` of ``n``."""
    if n == 0 or successes <= 0:
        return 0.0
    return float(stats.beta.ppf(delta, successes, n - successes + 1))


def certified_cut(confidence: np.ndarray, wrong: np.ndarray, max_risk: float,
                  delta: float = DELTA, min_answers: int = MIN_ANSWERS) -> float:
    """The lowest cut whose answers' error is certified <= ``max_risk`` (inf: none is).

    The scan starts where ``min_answers`` photos pass (a choice made without
    labels, so the fixed sequence stays valid) and stops at the first cut that
    fails: Learn-then-Test's family-wise guarantee. ``delta`` None: the plain
    error rate instead of its bound (too few photos to certify anything).
    """
    floor = (1 if delta is None else
             max(min_answers, int(np.ceil(np.log(delta) / np.log(1 - max_risk)))))
    best = np.inf
    for cut in CUT_GRID:
        passed = confidence >= cut
        n = int(passed.sum())
        if n < floor:
            continue
        errors = int(wrong[passed].sum())
        bound = errors / n if delta is None else clopper_pearson_upper(errors, n, delta)
        if bound > max_risk:
            break
        best = float(cut)
    return best


def certifiable(n: int, max_risk: float, delta: float = DELTA) -> bool:
    """Whether ``n`` photos are enough for a cut to be tested at all."""
    return n >= max(MIN_ANSWERS, int(np.ceil(np.log(delta) / np.log(1 - max_risk))))


@dataclass(frozen=True)
class GroupCuts:
    cuts: dict[str, float]  # group name -> cut (inf: the group never answers)
    risk: dict[str, float]  # the target each cut is certified at
    borrowed: tuple[str, ...]  # groups without calibration photos: strictest cut
    uncertified: tuple[str, ...] = ()  # too few photos to certify: the plain error rate

    def thresholds(self, base: Thresholds) -> Thresholds:
        finite = [c for c in self.cuts.values() if np.isfinite(c)]
        ceiling = float(np.nextafter(1.0, 2.0))  # above every probability: never answers
        pick = {g: (c if np.isfinite(c) else ceiling) for g, c in self.cuts.items()}
        if not finite:
            pick = dict.fromkeys(pick, ceiling)
        return Thresholds(**{**base.__dict__, "answer": pick["common"],
                             "answer_rare": pick["rare"], "answer_runtime": pick["runtime"]})


def group_cuts(confidence: np.ndarray, wrong: np.ndarray, groups: np.ndarray,
               max_risk: dict[str, float], delta: float = DELTA) -> GroupCuts:
    """Certified cuts per group. A group with too few photos to certify anything gets the
    plain error rate's cut, and says so; one with no photo at all borrows: runtime
    species (never in a calibration set) the rare group's cut — a few curator photos
    make them rare species — else the strictest cut found."""
    cuts, borrowed, uncertified = {}, [], []
    for group in SpeciesGroup:
        name = group.name.lower()
        mine = groups == group
        if not mine.any():
            borrowed.append(name)
            continue
        sure = certifiable(int(mine.sum()), max_risk[name], delta)
        if not sure:
            uncertified.append(name)
        cuts[name] = certified_cut(confidence[mine], wrong[mine], max_risk[name],
                                   delta if sure else None)
    strictest = max((c for c in cuts.values() if np.isfinite(c)), default=np.inf)
    for name in borrowed:
        cuts[name] = cuts.get("rare", strictest) if name == "runtime" else strictest
    return GroupCuts(cuts, dict(max_risk), tuple(borrowed), tuple(uncertified))


def within_outside_target(confidence: np.ndarray, wrong: np.ndarray, groups: np.ndarray,
                          outside_confidence: np.ndarray, outside_groups: np.ndarray,
                          max_risk: dict[str, float], limit: float, delta: float = DELTA
                          ) -> GroupCuts:
    """``group_cuts`` for ``max_risk``, every target lowered to a common level (the
    highest that is enough) until photos of species outside the catalog are answered at
    most ``limit`` of the time. They are stood in for by labelled photos scored without
    their own species (``without_own_species``): their confidence and group."""
    found = group_cuts(confidence, wrong, groups, max_risk, delta)
    if answered_share(outside_confidence, outside_groups, found) <= limit:
        return found
    levels = RISK_GRID[max(max_risk.values()) > RISK_GRID]
    lo, hi = 0, len(levels) - 1  # bisect for the highest level that is enough
    best = GroupCuts(dict.fromkeys(max_risk, np.inf), dict.fromkeys(max_risk, 0.0), ())
    while lo <= hi:
        mid = (lo + hi) // 2
        level = float(levels[mid])
        trial = group_cuts(confidence, wrong, groups,
                           {g: min(r, level) for g, r in max_risk.items()}, delta)
        if answered_share(outside_confidence, outside_groups, trial) <= limit:
            best, lo = trial, mid + 1
        else:
            hi = mid - 1
    return best


def flatter_prior_weights(truth: np.ndarray, power: float = FLATTEN) -> np.ndarray:
    """Photo weights moving the calibration set's species prior toward a flat one: each
    photo counts ``n_species ** -power`` (0: as sampled, 1: every species the same)."""
    counts = np.bincount(np.maximum(truth, 0))
    w = counts[np.maximum(truth, 0)].astype(np.float64) ** -power
    return w / w.mean() if len(w) else w


def cuts_at_coverage(confidence: np.ndarray, wrong: np.ndarray, groups: np.ndarray,
                     coverage: float, weights: np.ndarray | None = None,
                     delta: float = DELTA, coverage_delta: float | None = COVERAGE_DELTA
                     ) -> tuple[GroupCuts, float]:
    """The lowest common risk level whose certified cuts answer ``coverage`` of the photos
    (weighted: see ``flatter_prior_weights``); the level is returned too.

    ``coverage_delta``: the share answered must pass ``coverage`` by its one-sided
    Clopper–Pearson lower bound at that level (on the weights' effective sample size),
    not only by its point value: new photos then get at least ``coverage`` with
    that confidence. None: the point value."""
    last = None
    n_eff = effective_size(weights, len(confidence))
    for level in RISK_GRID:
        found = group_cuts(confidence, wrong, groups, dict.fromkeys(GROUP_NAMES, level), delta)
        last = (found, float(level))
        share = answered_share(confidence, groups, found, weights)
        if coverage_delta is not None:
            share = float(stats.beta.ppf(coverage_delta, share * n_eff,
                                         n_eff - share * n_eff + 1)) if share > 0 else 0.0
        if share >= coverage:
            return found, float(level)
    assert last is not None
    return last


def effective_size(weights: np.ndarray | None, n: int) -> float:
    """Kish's effective sample size of weighted photos, ``(sum w)^2 / sum w^2``."""
    if weights is None or not len(weights):
        return float(n)
    w = np.asarray(weights, np.float64)
    return float(w.sum() ** 2 / max((w ** 2).sum(), 1e-300))


def answered_share(confidence: np.ndarray, groups: np.ndarray, found: GroupCuts,
                   weights: np.ndarray | None = None) -> float:
    cut = np.array([found.cuts[g.name.lower()] for g in SpeciesGroup])[groups]
    if not len(confidence):
        return 0.0
    return float(np.average(confidence >= cut, weights=weights))


def without_own_species(distribution: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each labelled photo's distribution had its species been missing from the catalog:
    the stand-in for photos of species outside it (their look-alikes take the mass)."""
    dist = np.array(distribution, dtype=np.float64)
    known = truth >= 0
    dist[np.flatnonzero(known), truth[known]] = 0.0
    total = dist.sum(axis=1, keepdims=True)
    return dist / np.where(total > 0, total, 1.0)
