"""Fitting the place-and-season prior: occurrence records in, bandwidths chosen by held-out
log-likelihood, one density per species out (``biolit-id prior fit``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from biolit_id.server.decision.prior import (
    SpaceSeasonPrior,
    day_angle,
    seasonal_concentration,
    spatial_concentration,
    unit_vectors,
    vmf_sphere,
    von_mises,
)

log = logging.getLogger(__name__)

COLUMNS = ("scientificName", "decimalLatitude", "decimalLongitude", "eventDate")
OPTIONAL = ("year", "month", "day", "species", "coordinateUncertaintyInMeters")
BANDWIDTHS_KM = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
SEASON_DAYS = (5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 365.0)  # the last two are all but flat
LOO_FLOOR = 0.01
SPHERE, CIRCLE = 1.0 / (4.0 * np.pi), 1.0 / (2.0 * np.pi)  # uniform densities
MIN_RECORDS = 30  # fewer: the species takes the bandwidth best for all species together
_DATE = re.compile(r"^(\d{4})-(\d{2})(?:-(\d{2}))?")


class OccurrenceError(ValueError):
    """An occurrence file that cannot be used; the message says why."""


# ---------------------------------------------------------------- reading


def read_occurrences(path: Path):
    """The file as a DataFrame with at least the four Darwin Core columns."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise OccurrenceError(f"occurrence file {path} does not exist")
    wanted = set(COLUMNS) | set(OPTIONAL)
    try:
        if path.suffix.lower() in {".parquet", ".pq"}:
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            frame = pd.read_parquet(path, columns=[c for c in names if c in wanted])
        else:
            with path.open(encoding="utf-8", errors="replace") as f:
                header = f.readline()
            sep = "\t" if "\t" in header else (";" if header.count(";") > header.count(",")
                                               else ",")
            frame = pd.read_csv(path, sep=sep, usecols=lambda c: c in wanted, dtype=str,
                                quoting=3 if sep == "\t" else 0, on_bad_lines="skip")
    except (OSError, ValueError) as exc:
        raise OccurrenceError(f"cannot read {path}: {exc}") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise OccurrenceError(f"{path} lacks Darwin Core column(s) {missing}")
    return frame


def match_names(raw: list[str], known: list[str]) -> list[str]:
    """GBIF names carry authorship ("Carcinus maenas (Linnaeus, 1758)"): map each to the
    longest known name it starts with; unknown names keep their first two words."""
    by_length = sorted(set(known), key=len, reverse=True)
    cache: dict[str, str] = {}
    out = []
    for name in raw:
        name = " ".join(str(name).split())
        if name not in cache:
            hit = next((k for k in by_length if name == k or name.startswith(k + " ")), None)
            cache[name] = hit or " ".join(name.split()[:2])
        out.append(cache[name])
    return out


def record_days(frame) -> np.ndarray:
    """Day angle per record from eventDate (date, datetime, month or interval start),
    else year/month/day columns; NaN when unknown."""
    import datetime as dt

    dates = frame["eventDate"].fillna("").astype(str).tolist()
    years = frame["year"].tolist() if "year" in frame else [None] * len(dates)
    months = frame["month"].tolist() if "month" in frame else [None] * len(dates)
    days = frame["day"].tolist() if "day" in frame else [None] * len(dates)
    out = np.full(len(dates), np.nan)
    for i, text in enumerate(dates):
        m = _DATE.match(text.strip())
        parts = (m.group(1), m.group(2), m.group(3) or "15") if m else (years[i], months[i],
                                                                          days[i])
        try:
            out[i] = day_angle(dt.date(int(float(parts[0])), int(float(parts[1])),
                                       int(float(parts[2]))))
        except (TypeError, ValueError):
            continue
    return out


def clean_records(frame, known: list[str]) -> tuple[list[str], np.ndarray, np.ndarray,
                                                     np.ndarray, dict]:
    """(names, lat, lon, day angle) of usable records, and what was dropped."""
    lat = np.asarray(frame["decimalLatitude"], dtype=object)
    lon = np.asarray(frame["decimalLongitude"], dtype=object)
    lat = np.array([_float(v) for v in lat])
    lon = np.array([_float(v) for v in lon])
    ok = (np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180)
          & ~((lat == 0) & (lon == 0)))  # 0,0 is a classic placeholder
    names_col = frame["scientificName"].fillna("").astype(str).tolist()
    ok &= np.array([bool(n.strip()) for n in names_col])
    names = match_names([n for n, keep in zip(names_col, ok, strict=True) if keep], known)
    day = record_days(frame)[ok]
    report = {"records": len(frame), "used": int(ok.sum()),
              "dropped_bad_coordinates_or_name": int((~ok).sum()),
              "without_date": int(np.isnan(day).sum())}
    return names, lat[ok], lon[ok], day, report


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# ---------------------------------------------------------------- fitting


def _loo_loglik(kernel: np.ndarray, uniform: float) -> np.ndarray:
    """Per point, leave-one-out log-density under a square kernel matrix (diagonal left out).

    Mixed with a little of the uniform density, as the prior is when applied: a lone
    stray record (a vagrant, a wrong label) must not push every bandwidth wide.
    """
    n = len(kernel)
    dens = (kernel.sum(axis=1) - np.diag(kernel)) / (n - 1)
    return np.log((1.0 - LOO_FLOOR) * dens + LOO_FLOOR * uniform)


def smoothest_within_one_se(loglik: np.ndarray) -> int:
    """Index of the widest bandwidth (grids are ascending) whose leave-one-out likelihood is
    within one standard error of the best one (Breiman's one-SE rule): a difference the
    records cannot tell from noise must not make a species' density bumpy."""
    means = loglik.mean(axis=1)
    best = int(np.argmax(means))
    for j in range(loglik.shape[0] - 1, best, -1):
        diff = loglik[best] - loglik[j]
        if diff.mean() <= diff.std(ddof=1) / np.sqrt(len(diff)):
            return j
    return best


def choose_bandwidths(points: np.ndarray, days: np.ndarray, groups: dict[str, np.ndarray],
                      min_records: int = MIN_RECORDS) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per species, the spatial and seasonal bandwidth by leave-one-out likelihood.

    Species with fewer than ``min_records`` (dated) records take the bandwidth
    best for all species together.
    """
    names = list(groups)
    space: list[np.ndarray | None] = []
    season: list[np.ndarray | None] = []
    for name in names:
        rows = groups[name]
        cos = np.clip(points[rows] @ points[rows].T, -1.0, 1.0)
        space.append(np.stack([_loo_loglik(vmf_sphere(cos, spatial_concentration(bw)), SPHERE)
                               for bw in BANDWIDTHS_KM]) if len(rows) >= 2 else None)
        dated = days[rows][~np.isnan(days[rows])]
        delta = dated[:, None] - dated[None, :]
        season.append(np.stack([_loo_loglik(von_mises(delta, seasonal_concentration(sd)), CIRCLE)
                                for sd in SEASON_DAYS]) if len(dated) >= 2 else None)

    def choose(grid: tuple[float, ...], scores: list[np.ndarray | None]) -> np.ndarray:
        usable = [s for s in scores if s is not None]
        overall = (grid[smoothest_within_one_se(np.concatenate(usable, axis=1))]
                   if usable else grid[len(grid) // 2])
        return np.array([grid[smoothest_within_one_se(s)]
                         if s is not None and s.shape[1] >= min_records else overall
                         for s in scores], dtype=np.float64), overall

    bandwidth, overall_bw = choose(BANDWIDTHS_KM, space)
    seasonal, overall_sd = choose(SEASON_DAYS, season)
    report = {"method": "leave-one-out likelihood per species, one-SE rule",
              "overall_bandwidth_km": overall_bw, "overall_season_days": overall_sd,
              "grid_km": list(BANDWIDTHS_KM), "grid_days": list(SEASON_DAYS)}
    return bandwidth, seasonal, report


def fit_prior(names: list[str], lat: np.ndarray, lon: np.ndarray, day: np.ndarray,
              bandwidth_km: float | None = None, season_days: float | None = None,
              max_records: int = 2000, seed: int = 0, meta: dict | None = None
              ) -> SpaceSeasonPrior:
    """Group records by species (at most ``max_records`` each, a seeded sample)."""
    rng = np.random.default_rng(seed)
    points = unit_vectors(lat, lon)
    labels = np.asarray(names, dtype=object)
    species = sorted(set(names))
    groups: dict[str, np.ndarray] = {}
    for name in species:
        rows = np.flatnonzero(labels == name)
        if len(rows) > max_records:
            rows = np.sort(rng.choice(rows, max_records, replace=False))
        groups[name] = rows
    bandwidth, seasonal, report = choose_bandwidths(points, day, groups)
    if bandwidth_km is not None:
        bandwidth[:] = bandwidth_km
        report["overall_bandwidth_km"] = bandwidth_km
    if season_days is not None:
        seasonal[:] = season_days
        report["overall_season_days"] = season_days
    order = np.concatenate([groups[n] for n in species]) if species else np.zeros(0, int)
    offsets = np.concatenate([[0], np.cumsum([len(groups[n]) for n in species])])
    return SpaceSeasonPrior(tuple(species), points[order], day[order], offsets.astype(np.int64),
                            bandwidth, seasonal, {**(meta or {}), "bandwidth_selection": report})


# ---------------------------------------------------------------- commands
