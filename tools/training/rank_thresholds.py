"""Rank thresholds that bound the MEAN precision of a rank's answers (docs/taxonomy.md).

A photo not answered at species is answered at the finest rank whose lineage
mass passes that rank's threshold (``server.decision.ranks.taxon_fallback``).
Per rank, finest first, on the photos no finer rank has answered, the threshold
is the lowest mass (never below ``floor``) at which the one-sided
Clopper-Pearson lower bound (level ``delta``) of the precision of ALL that
rank's answers stays >= ``precision``: the bound is on their mean, not on each
answer. Thresholds are scanned from high to low and the scan stops at the first
that fails (a fixed sequence, so the bound holds for the one kept); a rank that
never certifies gets no threshold (it never answers).

``mean_precision_thresholds`` fits them on labelled photos (a calibration set);
``simulated_rank_thresholds`` is the default when there is none: photos
simulated around the bundle's own prototypes, decided by the bundle's own
scorer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from biolit_id.cli.training.risk_control import clopper_pearson_lower
from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.catalog.catalog import FALLBACK_RANKS, Catalog
from biolit_id.server.decision.bundle import Bundle
from biolit_id.server.decision.ranks import taxon_contains, taxon_of
from biolit_id.server.decision.registry import scorer_for
from biolit_id.server.decision.types import RankAnswer

PRECISION = 0.9  # the mean precision a rank's answers must keep
DELTA = 0.1  # one-sided Clopper-Pearson level
FLOOR = 0.5  # never answer a taxon holding less than half the mass
MIN_ANSWERS = 10
# High to low: 0.995 ... 0.90 by 0.005, then 0.89 ... 0.05 by 0.01 (cut at ``floor``).
GRID: tuple[float, ...] = tuple(  # coarser than the answer cuts: a rank needs many answers
    float(t) for t in np.round(np.r_[np.arange(0.995, 0.90, -0.005),
                                     np.arange(0.90, 0.049, -0.01)], 3))

# The simulation's defaults (docs/taxonomy.md, "Rank thresholds").
METHOD = "prototype-simulation/1"
PHOTOS_PER_SPECIES = 30
MEDIAN_COSINE = 0.30  # of a photo to its own prototype: the seed v2's 79 real crops
SIMULATION_SEED = 27
DRAWS = 5  # independent draws; a rank must certify on each
RAW_NORM = 0.85  # |f - mu| of a unit embedding (tools/evaluation/longtail.py)
RESIDUAL = 0.02  # isotropic noise outside the whitening's directions (ditto)


def min_answers(precision: float = PRECISION, delta: float = DELTA) -> int:
    """Fewest answers a threshold is tested on: twice what could certify were all right."""
    return max(MIN_ANSWERS, math.ceil(2 * math.log(delta) / math.log(precision)))


@dataclass
class RankFit:
    """One rank's outcome: its threshold (None: it never answers) and what certified it."""

    threshold: float | None
    candidates: int  # photos reaching this rank (no finer answer), with a taxon at it
    answers: int = 0  # of them, with mass >= threshold
    right: int = 0
    lower_bound: float = 0.0

    def report(self) -> dict:
        out: dict = {"threshold": self.threshold, "candidates": self.candidates}
        if self.threshold is not None:
            out.update(answers=self.answers, right=self.right,
                       precision=round(self.right / self.answers, 4),
                       lower_bound=round(self.lower_bound, 4))
        return out


def fit_mean_precision(masses: Mapping[str, np.ndarray], right: Mapping[str, np.ndarray],
                       precision: float = PRECISION, delta: float = DELTA,
                       floor: float = FLOOR, ranks: Sequence[str] = FALLBACK_RANKS
                       ) -> dict[str, RankFit]:
    """The rule on arrays: per rank, each photo's best-taxon mass (NaN: no taxon at that
    rank) and whether that taxon is right; rows are the photos not answered at species."""
    n_rows = len(next(iter(masses.values()))) if masses else 0
    left = np.ones(n_rows, dtype=bool)
    need = min_answers(precision, delta)
    fits: dict[str, RankFit] = {}
    for rank in ranks:
        m = np.nan_to_num(np.asarray(masses.get(rank, np.full(n_rows, np.nan)), float), nan=-1.0)
        ok = np.asarray(right.get(rank, np.zeros(n_rows, bool)), dtype=bool)
        fit = RankFit(None, int((left & (m >= 0)).sum()))
        for t in (t for t in GRID if t >= floor):
            sel = left & (m >= t)
            n = int(sel.sum())
            if n < need:
                continue
            k = int(ok[sel].sum())
            bound = clopper_pearson_lower(k, n, delta)
            if bound < precision:
                break
            fit = RankFit(t, fit.candidates, n, k, bound)
        if fit.threshold is not None:
            left &= ~(m >= fit.threshold)
        fits[rank] = fit
    return fits


def answer_arrays(answers: Sequence[Sequence[RankAnswer]], truths: Sequence[str],
                  catalog: Catalog, ranks: Sequence[str] = FALLBACK_RANKS
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per rank, (mass, right) of each photo's best taxon, from ``rank_confidences`` rows."""
    masses = {r: np.full(len(answers), np.nan) for r in ranks}
    right = {r: np.zeros(len(answers), dtype=bool) for r in ranks}
    for i, (row, truth) in enumerate(zip(answers, truths, strict=True)):
        for a in row:
            if a.rank in masses:
                masses[a.rank][i] = a.confidence
                right[a.rank][i] = taxon_contains(a.rank, a.taxon, truth, catalog)
    return masses, right


def mean_precision_thresholds(answers: Sequence[Sequence[RankAnswer]], truths: Sequence[str],
                              catalog: Catalog, precision: float = PRECISION,
                              delta: float = DELTA, floor: float = FLOOR) -> dict[str, float]:
    """{rank: threshold} from labelled photos NOT answered at species: each photo's
    ``rank_confidences`` (``Identification.rank_confidences``) and its true species.
    Ranks that do not certify are left out (they never answer)."""
    masses, right = answer_arrays(answers, truths, catalog)
    fits = fit_mean_precision(masses, right, precision, delta, floor)
    return {r: f.threshold for r, f in fits.items() if f.threshold is not None}


# ------------------------------------------------------------ the default, by simulation


@dataclass
class SimulatedThresholds:
    """The default thresholds and how they were derived (written to the bundle manifest)."""

    thresholds: dict[str, float]
    report: dict = field(default_factory=dict)


def spread_for(median_cosine: float) -> float:
    """Noise norm s putting the median cosine of unit(p + s u) to p at ``median_cosine``
    (u a uniform unit vector: for s > 1 the cosine rises with u.p, whose median is 0)."""
    return math.sqrt(1.0 / median_cosine ** 2 - 1.0)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def simulated_photos(bundle: Bundle, per_species: int, spread: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(unit embeddings, species row): around each visual prototype (the mean of the
    species' photos, in the prototype space), isotropic noise of norm ``spread``,
    mapped back through the whitening to embeddings of the usual norm."""
    protos = _unit(np.asarray(bundle.visual_prototypes, np.float64))
    n_species, dim = protos.shape
    y = np.repeat(np.arange(n_species), per_species)
    w = _unit(protos[y] + spread * _unit(rng.standard_normal((len(y), dim))))
    if bundle.whitening_W is None:
        return w.astype(np.float32), y
    mu = np.asarray(bundle.whitening_mu, np.float64)
    wm = np.asarray(bundle.whitening_W, np.float64)  # [D, P], full column rank
    back = np.linalg.solve(wm.T @ wm, wm.T)  # its pseudo-inverse [P, D]
    typical = np.linalg.norm(_unit(rng.standard_normal((256, dim))) @ back, axis=1).mean()
    residual = rng.standard_normal((len(y), mu.shape[1])) * RESIDUAL / math.sqrt(mu.shape[1])
    raw = mu + (RAW_NORM / typical) * w @ back + residual
    return _unit(raw).astype(np.float32), y


def lineage_masses(distribution: np.ndarray, names: Sequence[str], catalog: Catalog,
                   ranks: Sequence[str] = FALLBACK_RANKS
                   ) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Per rank, (best taxon's mass [B], its name [B]): ``ranks.rank_confidences``'s
    top-1 for a batch (the same ``taxon_of``; NaN and "" where no species has a taxon)."""
    dist = np.clip(np.asarray(distribution, np.float64), 0.0, None)
    out = {}
    for rank in ranks:
        taxa = [taxon_of(catalog.get(n), rank) for n in names]
        labels = sorted({t for t in taxa if t})
        if not labels:
            out[rank] = (np.full(len(dist), np.nan), [""] * len(dist))
            continue
        col = {t: j for j, t in enumerate(labels)}
        member = np.zeros((len(names), len(labels)))
        for i, t in enumerate(taxa):
            if t:
                member[i, col[t]] = 1.0
        mass = dist @ member
        best = mass.argmax(1)
        out[rank] = (np.minimum(mass[np.arange(len(dist)), best], 1.0),
                     [labels[j] for j in best])
    return out


def _simulated_fit(bundle: Bundle, catalog: Catalog, scorer, per_species: int, spread: float,
                   seed: int, precision: float, delta: float, floor: float
                   ) -> tuple[dict[str, RankFit], dict]:
    """One draw: simulated photos, the bundle's own decision, the rule on the unanswered."""
    embeddings, y = simulated_photos(bundle, per_species, spread, np.random.default_rng(seed))
    names = tuple(bundle.species)
    protos = PrototypeSet(names, np.asarray(bundle.prototypes, np.float32))
    scores = scorer.score(embeddings, protos)
    species = np.asarray(scores.routed.species)
    open_rows = np.flatnonzero(species < 0)
    best = lineage_masses(scores.distribution[open_rows], names, catalog)
    masses = {r: m for r, (m, _) in best.items()}
    right = {r: np.array([taxon_contains(r, t, names[y[i]], catalog)
                          for t, i in zip(taxa, open_rows, strict=True)], dtype=bool)
             for r, (_, taxa) in best.items()}
    answered = species >= 0
    return fit_mean_precision(masses, right, precision, delta, floor), {
        "seed": seed, "photos": len(y), "species_answered": int(answered.sum()),
        "species_precision": round(float((species[answered] == y[answered]).mean()), 4)
        if answered.any() else None,
        "not_answered": len(open_rows)}


def simulated_rank_thresholds(bundle: Bundle, catalog: Catalog,
                              per_species: int = PHOTOS_PER_SPECIES,
                              median_cosine: float = MEDIAN_COSINE,
                              seed: int = SIMULATION_SEED, draws: int = DRAWS,
                              precision: float = PRECISION, delta: float = DELTA,
                              floor: float = FLOOR) -> SimulatedThresholds:
    """The default rank thresholds of a bundle with no calibration set, deterministic.

    ``draws`` independent draws (seeds ``seed``, ``seed + 1``...) of ``per_species``
    photos around each of the bundle's prototypes (median cosine to their own
    prototype ``median_cosine``), scored by the bundle's own scorer
    (``registry.scorer_for``) over its own prototypes; the photos it does not answer
    at species give their lineage masses to ``fit_mean_precision``. A rank answers only
    if it certifies on every draw, at the highest of their thresholds: the simulation's
    own luck does not turn a rank on. A scorer with rank answers of its own
    (``owns_rank_answers``) would ignore thresholds: none.
    """
    scorer = scorer_for(bundle)
    report: dict = {"method": METHOD, "photos_per_species": per_species,
                    "median_cosine": median_cosine, "seed": seed, "draws": draws,
                    "precision": precision, "delta": delta, "floor": floor}
    if scorer.owns_rank_answers:
        report["skipped"] = f"routing {bundle.routing} gives rank answers of its own"
        return SimulatedThresholds({}, report)
    spread = spread_for(median_cosine)
    fits, runs = [], []
    for k in range(draws):
        fit, run = _simulated_fit(bundle, catalog, scorer, per_species, spread, seed + k,
                                  precision, delta, floor)
        run["ranks"] = {r: f.report() for r, f in fit.items()}
        fits.append(fit)
        runs.append(run)
    thresholds: dict[str, float] = {}
    ranks: dict[str, dict] = {}
    for rank in FALLBACK_RANKS:
        got = [f[rank] for f in fits]
        on = all(f.threshold is not None for f in got)
        answers, right = sum(f.answers for f in got), sum(f.right for f in got)
        ranks[rank] = {"threshold": max(f.threshold for f in got) if on else None,
                       "certified_draws": sum(f.threshold is not None for f in got)}
        if on:
            thresholds[rank] = ranks[rank]["threshold"]
            ranks[rank].update(answers=answers, right=right,
                               precision=round(right / answers, 4),
                               lower_bound=round(min(f.lower_bound for f in got), 4))
    report.update(spread=round(spread, 4), ranks=ranks, runs=runs)
    return SimulatedThresholds(thresholds, report)


def summary_line(report: dict) -> str:
    """One line for a command's output: thresholds and simulated precision per rank."""
    if "skipped" in report:
        return f"  rank thresholds: none ({report['skipped']})"
    parts = []
    for rank, info in report.get("ranks", {}).items():
        if info.get("threshold") is None:
            parts.append(f"{rank} off")
        else:
            parts.append(f"{rank} {info['threshold']:.2f} ({info['right']}/{info['answers']} "
                         f"simulated answers right, bound >= {info['lower_bound']:.2f})")
    return (f"  rank thresholds ({report['method']}, spread {report.get('spread')}, seeds "
            f"{report['seed']}..{report['seed'] + report['draws'] - 1}): " + ", ".join(parts))
