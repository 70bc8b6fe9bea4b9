"""Bootstrap intervals over test photos: every figure of ``bench-quality`` with its 95 % interval.

Test photos are resampled with replacement, within each stratum (one stratum per
generated data set, so a figure pooled over seeds keeps each seed's photo count),
and the same resamples serve every method, so differences between methods are
paired. The interval is the bias-corrected percentile interval (Efron 1987):
statistics such as ECE are biased upward on resamples, and the plain percentile
interval can then miss the point estimate altogether. Where even the corrected
interval leaves the point outside (a figure far from its resamples' distribution,
e.g. ECE over a few dozen answers), it is widened to the point and the figure is
listed in ``widened``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np

Statistic = Callable[[Sequence[np.ndarray]], dict[str, float]]
LEVEL = 0.95
DEFAULT_RESAMPLES = 1000


def bc_interval(point: float, replicates: np.ndarray, level: float = LEVEL
                ) -> tuple[float, float]:
    """Bias-corrected percentile interval of ``point`` from its bootstrap ``replicates``.

    The point counts as one more replicate; ``nan`` replicates (a figure undefined
    on a resample, e.g. no rare answer) are left out.
    """
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if not np.isfinite(point):
        return float("nan"), float("nan")
    if not len(reps):
        return float(point), float(point)
    norm = NormalDist()
    b = len(reps)
    below = (np.sum(reps < point) + 0.5 * np.sum(reps == point)) / b
    z0 = norm.inv_cdf(min(max(below, 0.5 / b), 1 - 0.5 / b))
    z = norm.inv_cdf(0.5 + level / 2)
    lo_q, hi_q = norm.cdf(2 * z0 - z), norm.cdf(2 * z0 + z)
    values = np.append(reps, point)
    lo = np.quantile(values, lo_q, method="lower")  # no interpolation: observed values
    hi = np.quantile(values, hi_q, method="higher")
    return float(lo), float(hi)


def resample(sizes: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """One bootstrap draw: row indices per stratum, with replacement."""
    return [rng.integers(0, n, n) if n else np.zeros(0, dtype=np.int64) for n in sizes]


def bootstrap(statistic: Statistic, sizes: Sequence[int],
              resamples: int = DEFAULT_RESAMPLES, seed: int = 0
              ) -> tuple[dict[str, list[float]], list[str]]:
    """(``{figure: [point, lower, upper]}``, widened figures) of ``statistic`` over
    resampled test photos.

    ``statistic`` receives one index array per stratum (all rows for the point
    estimate) and returns named figures; figures may be ``nan`` where undefined.
    """
    point = statistic([np.arange(n) for n in sizes])
    rng = np.random.default_rng(seed)
    reps: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(resamples):
        draw = statistic(resample(sizes, rng))
        for k in point:
            reps[k].append(draw.get(k, float("nan")))
    out, widened = {}, []
    for k, v in point.items():
        lo, hi = bc_interval(v, np.asarray(reps[k]))
        if np.isfinite(v) and not lo <= v <= hi:
            widened.append(k)
            lo, hi = min(lo, v), max(hi, v)
        out[k] = [float(v), lo, hi]
    return out, widened
