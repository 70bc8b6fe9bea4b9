"""``biolit-id prior``: fit the place-and-season prior and the observation combiner.

* ``prior fit --occurrences FILE`` reads occurrence records in Darwin Core
  columns (``scientificName``, ``decimalLatitude``, ``decimalLongitude``,
  ``eventDate``; CSV, GBIF's tab-separated download, or Parquet), picks the
  spatial and seasonal bandwidths by held-out log-likelihood and writes
  ``prior.npz``/``prior.json`` into ``BUNDLE/prior/`` (``--bundle``),
  ``DATA_DIR/prior/`` (``--data-dir``) or ``--out``. With ``--observations``
  it then runs ``calibrate``.
* ``prior calibrate --bundle B --observations VAL`` fits the combiner (photo
  correlation, outlier rate, pooled exponent) and the prior's weight and floor
  on validation observations (``tools/training/observation_data.py`` layout) and writes
  ``combiner.json`` beside the prior.
* ``prior synth --out DIR`` writes a SYNTHETIC world to try all of this on.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np

from biolit_id.cli.training.datasets import DatasetError
from biolit_id.server.decision.bundle import BundleError
from biolit_id.server.decision.prior import (
    PRIOR_DIR,
    PRIOR_JSON,
    SpaceSeasonPrior,
    day_angle,
    load_prior,
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


def prior_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "out", None):
        return Path(args.out)
    if getattr(args, "bundle", None):
        return Path(args.bundle) / PRIOR_DIR
    if getattr(args, "data_dir", None):
        return Path(args.data_dir) / PRIOR_DIR
    raise SystemExit("say where the prior goes: --bundle, --data-dir or --out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="prior_command", metavar="ACTION", required=True)
    fit = sub.add_parser("fit", help="fit the prior from occurrence records")
    fit.add_argument("--occurrences", type=Path, required=True,
                     help="Darwin Core CSV/TSV or Parquet (GBIF download, BioLit export)")
    _where(fit)
    fit.add_argument("--bandwidth-km", type=float, default=None,
                     help="spatial kernel std (default: chosen by held-out likelihood)")
    fit.add_argument("--season-days", type=float, default=None,
                     help="seasonal kernel std in days (default: chosen likewise)")
    fit.add_argument("--max-records", type=int, default=2000, help="per species")
    fit.add_argument("--observations", type=Path, default=None,
                     help="validation observations: also fit the combiner (needs --bundle)")
    cal = sub.add_parser("calibrate", help="fit the combiner and prior weight on validation")
    cal.add_argument("--observations", type=Path, required=True)
    _where(cal)
    cal.add_argument("--answer", type=float, default=None,
                     help="cut on the observation answer's probability (default: keep, 0.5)")
    syn = sub.add_parser("synth", help="write a SYNTHETIC world (bundle, records, observations)")
    syn.add_argument("--out", type=Path, required=True)
    syn.add_argument("--correlated", action="store_true",
                     help="photos of one observation share an offset (half the spread)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--dim", type=int, default=512)


def _where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None,
                        help="bundle: the prior goes to BUNDLE/prior/")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="or the service's data directory: DATA_DIR/prior/")
    parser.add_argument("--out", type=Path, default=None, help="or this folder")
    parser.add_argument("--catalog", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    try:
        if args.prior_command == "synth":
            return _synth(args)
        if args.prior_command == "fit":
            code = _fit(args)
            if code or args.observations is None:
                return code
        return _calibrate(args)
    except (OccurrenceError, DatasetError, BundleError) as exc:
        log.error("%s", exc)
        return 2


def _known_names(args: argparse.Namespace) -> list[str]:
    from biolit_id.server.catalog.catalog import Catalog
    from biolit_id.server.decision.bundle import load_bundle

    catalog = Catalog.load(args.catalog) if args.catalog else Catalog.load_default()
    known = list(catalog.names())
    if args.bundle is not None:
        known += list(load_bundle(args.bundle).species)
    return known


def _fit(args: argparse.Namespace) -> int:
    import hashlib

    frame = read_occurrences(args.occurrences)
    names, lat, lon, day, report = clean_records(frame, _known_names(args))
    if not names:
        raise OccurrenceError(f"{args.occurrences}: no usable record")
    digest = hashlib.sha256(Path(args.occurrences).read_bytes()).hexdigest()[:16]
    prior = fit_prior(names, lat, lon, day, args.bandwidth_km, args.season_days,
                      args.max_records, meta={"source": str(args.occurrences),
                                              "source_sha256": digest, "records": report})
    out = prior.save(prior_dir(args))
    chosen = prior.meta["bandwidth_selection"]
    print(f"prior {prior.version}: {len(prior.species)} species, {report['used']} records "
          f"({report['dropped_bad_coordinates_or_name']} dropped, {report['without_date']} "
          f"without date); bandwidths per species, overall {chosen['overall_bandwidth_km']:g} km"
          f" and {chosen['overall_season_days']:g} days -> {out}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from biolit_id.cli.training.observation_data import read_observations
    from biolit_id.cli.training.observation_fit import fit_combiner, score_observations
    from biolit_id.server.decision.bundle import load_bundle
    from biolit_id.server.decision.observations import CombinerParams

    if args.bundle is None:
        raise SystemExit("calibrate scores the photos with a bundle: pass --bundle")
    bundle = load_bundle(args.bundle)
    data = read_observations(args.observations)
    data_fp = data.meta.get("model_fingerprint")
    if data_fp and data_fp != bundle.model_fingerprint:
        raise DatasetError(f"{args.observations}: embeddings made by model {data_fp}, "
                           f"the bundle's is {bundle.model_fingerprint}")
    folder = prior_dir(args)
    prior = load_prior(folder) if (folder / PRIOR_JSON).is_file() else None
    base = CombinerParams.load(folder)
    if getattr(args, "answer", None) is not None:
        base = base.replace(answer=args.answer)
    scored = score_observations(bundle, data, prior)
    params = fit_combiner(scored, base)
    path = params.save(folder)
    print(f"combiner fitted on {len(data)} observations -> {path}")
    for key in ("rho", "outlier", "pooled_gamma", "prior_weight", "prior_floor", "answer"):
        print(f"  {key:14s} {getattr(params, key):g}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from biolit_id.cli.training.synthetic_observations import write_world

    paths = write_world(args.out, dim=args.dim, seed=args.seed, correlated=args.correlated)
    print("SYNTHETIC world written:")
    for key, path in paths.items():
        print(f"  {key:12s} {path}")
    return 0
