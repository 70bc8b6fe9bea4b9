"""Where and when species occur: a smooth density per species in space and season.

The photo model answers p(species | photos) with a flat class prior, so the
place and date enter by Bayes as a factor on each species, the density of its
occurrence records at that place and day of year (presence-only geographical
priors, Mac Aodha et al. 2019). Space: von Mises–Fisher kernels on the sphere
around each record (a Gaussian in haversine distance at these bandwidths);
season: von Mises kernels on the day-of-year circle. Because both kernels
integrate to one, a request with only a place or only a date uses the exact
marginal. Space and season are estimated apart and multiplied,
``p(place | s) p(day | s)``: a joint kernel needs records close in both at
once, which a few hundred records per species do not give (measured in
docs/observations.md). Each species gets its own bandwidths, chosen by
leave-one-out likelihood when it is fitted. How strongly the factor counts
(``weight``) and the floor kept by species never recorded nearby are fitted
on validation observations (``server.decision.observations.CombinerParams``), not here.

Files (``biolit-id prior fit`` writes them, into ``BUNDLE/prior/`` or
``DATA_DIR/prior/``): ``prior.npz`` (records as unit vectors and day angles,
grouped by species) and ``prior.json`` (bandwidths, provenance).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biolit_id.index.core.atomic import atomic_write
from biolit_id.index.core.errors import InvalidRequestError

EARTH_RADIUS_KM = 6371.0088
PRIOR_DIR = "prior"
PRIOR_NPZ = "prior.npz"
PRIOR_JSON = "prior.json"
FORMAT = "biolit-id-prior/1"
# The background density, relative to a uniform one over the sphere (and the
# year): far from every record all species get it and the prior says nothing.
BACKGROUND = 1e-3
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class PriorError(ValueError):
    """A prior folder that cannot be used; the message says why."""


# ---------------------------------------------------------------- conversions


def unit_vectors(latitude: np.ndarray, longitude: np.ndarray) -> np.ndarray:
    """WGS84 degrees -> [N, 3] points on the unit sphere."""
    lat = np.radians(np.asarray(latitude, dtype=np.float64))
    lon = np.radians(np.asarray(longitude, dtype=np.float64))
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)


def day_angle(date: dt.date) -> float:
    """A date's position on the year circle, in radians (leap years stretched to fit)."""
    days = 366 if _is_leap(date.year) else 365
    return 2.0 * np.pi * (date.timetuple().tm_yday - 0.5) / days


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def parse_observed_on(text: str) -> float | None:
    """``observed_on`` -> day angle; "" -> None; anything but YYYY-MM-DD is refused."""
    if not text:
        return None
    if not _ISO_DATE.match(text):
        raise InvalidRequestError(f"observed_on must be an ISO date YYYY-MM-DD, got {text!r}")
    try:
        date = dt.date.fromisoformat(text)
    except ValueError:
        raise InvalidRequestError(f"observed_on {text!r} is not a calendar date") from None
    if date > dt.date.today() + dt.timedelta(days=1):
        raise InvalidRequestError(f"observed_on {text!r} is in the future")
    return day_angle(date)


@dataclass(frozen=True)
class Where:
    """A checked request position: degrees, and its uncertainty radius in km."""

    latitude: float
    longitude: float
    uncertainty_km: float = 0.0


def check_location(latitude: float, longitude: float, uncertainty_m: float) -> Where:
    values = (latitude, longitude, uncertainty_m)
    if not all(np.isfinite(v) for v in values):
        raise InvalidRequestError("location has a NaN or infinite value")
    if not -90.0 <= latitude <= 90.0:
        raise InvalidRequestError(f"location.latitude must be in [-90, 90], got {latitude}")
    if not -180.0 <= longitude <= 180.0:
        raise InvalidRequestError(f"location.longitude must be in [-180, 180], got {longitude}")
    if uncertainty_m < 0:
        raise InvalidRequestError(f"location.uncertainty_m must be >= 0, got {uncertainty_m}")
    return Where(float(latitude), float(longitude), float(uncertainty_m) / 1000.0)


# ---------------------------------------------------------------- kernels


def spatial_concentration(bandwidth_km, uncertainty_km: float = 0.0) -> np.ndarray:
    """vMF kappa for a kernel of this std (km); the position's uncertainty widens it."""
    sigma = np.hypot(np.asarray(bandwidth_km, dtype=np.float64), uncertainty_km)
    return 1.0 / np.maximum(sigma / EARTH_RADIUS_KM, 1e-9) ** 2


def seasonal_concentration(season_days) -> np.ndarray:
    sigma = 2.0 * np.pi * np.asarray(season_days, dtype=np.float64) / 365.25
    return np.minimum(1.0 / np.maximum(sigma, 1e-9) ** 2, 700.0)  # np.i0 overflows past ~713


def vmf_sphere(cosines: np.ndarray, kappa) -> np.ndarray:
    """von Mises–Fisher density on S^2 (per steradian), stable for large kappa."""
    norm = kappa / (2.0 * np.pi * -np.expm1(-2.0 * np.asarray(kappa)))
    return norm * np.exp(kappa * (cosines - 1.0))


def von_mises(delta: np.ndarray, kappa) -> np.ndarray:
    """von Mises density on the circle (per radian)."""
    kappa = np.asarray(kappa, dtype=np.float64)
    return np.exp(kappa * (np.cos(delta) - 1.0)) / (2.0 * np.pi * np.i0(kappa) * np.exp(-kappa))


# ---------------------------------------------------------------- the prior


@dataclass
class SpaceSeasonPrior:
    """Occurrence records grouped by species, and each species' kernel bandwidths."""

    species: tuple[str, ...]
    points: np.ndarray  # [M, 3] unit vectors
    days: np.ndarray  # [M] day angle in radians, NaN for records without a date
    offsets: np.ndarray  # [S + 1] records of species i are offsets[i]:offsets[i+1]
    bandwidth_km: np.ndarray  # [S] spatial kernel std
    season_days: np.ndarray  # [S] seasonal kernel std
    meta: dict = field(default_factory=dict)
    version: str = ""

    def __post_init__(self) -> None:
        self.bandwidth_km = np.asarray(self.bandwidth_km, dtype=np.float64)
        self.season_days = np.asarray(self.season_days, dtype=np.float64)
        self._owner = np.repeat(np.arange(len(self.species)), np.diff(self.offsets))
        self._counts = np.diff(self.offsets).astype(np.float64)
        dated = ~np.isnan(self.days)
        self._dated = np.bincount(self._owner[dated], minlength=len(self.species))
        self._index = {name: i for i, name in enumerate(self.species)}

    @property
    def record_counts(self) -> dict[str, int]:
        return {n: int(c) for n, c in zip(self.species, self._counts, strict=True)}

    def densities(self, names: Sequence[str], where: Where | None,
                  day: float | None) -> tuple[np.ndarray, np.ndarray, float]:
        """Per name: its density at (where, day) and whether it has records; the background.

        Names the prior has no records for get density NaN (callers treat them
        as an average species: the prior knows nothing about them).
        """
        if where is None and day is None:
            raise ValueError("densities needs a place, a date or both")
        n = len(self.species)
        per_species = np.ones(n)
        background = BACKGROUND
        if where is not None:
            kappa = spatial_concentration(self.bandwidth_km, where.uncertainty_km)[self._owner]
            query = unit_vectors(np.array([where.latitude]), np.array([where.longitude]))[0]
            kernel = vmf_sphere(self.points @ query, kappa)
            per_species *= np.bincount(self._owner, weights=kernel, minlength=n) / np.maximum(
                self._counts, 1.0)
            background /= 4.0 * np.pi
        if day is not None:
            dated = ~np.isnan(self.days)
            kappa_t = seasonal_concentration(self.season_days)[self._owner[dated]]
            kernel = von_mises(self.days[dated] - day, kappa_t)
            season = np.bincount(self._owner[dated], weights=kernel, minlength=n)
            # A species with no dated record: its season is unknown, i.e. uniform.
            per_species *= np.where(self._dated > 0, season / np.maximum(self._dated, 1),
                                    1.0 / (2.0 * np.pi))
            background /= 2.0 * np.pi
        out = np.full(len(names), np.nan)
        for i, name in enumerate(names):
            j = self._index.get(name)
            if j is not None and self._counts[j] > 0:
                out[i] = per_species[j]
        return out, ~np.isnan(out), background

    # ------------------------------------------------------------ storage

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, species=np.array(self.species, dtype=object).astype(str),
            points=self.points.astype(np.float64), days=self.days.astype(np.float64),
            offsets=self.offsets.astype(np.int64), bandwidth_km=self.bandwidth_km,
            season_days=self.season_days,
        )
        payload = buffer.getvalue()
        self.version = hashlib.sha256(payload).hexdigest()[:16]
        atomic_write(directory / PRIOR_NPZ, payload)
        meta = {**self.meta, "format": FORMAT, "version": self.version,
                "species": {name: {"records": count, "bandwidth_km": float(bw),
                                   "season_days": float(sd)}
                            for (name, count), bw, sd in zip(
                                self.record_counts.items(), self.bandwidth_km,
                                self.season_days, strict=True)}}
        atomic_write(directory / PRIOR_JSON, json.dumps(meta, indent=2, ensure_ascii=False))
        return directory


def load_prior(directory: Path) -> SpaceSeasonPrior:
    directory = Path(directory)
    try:
        meta = json.loads((directory / PRIOR_JSON).read_text("utf-8"))
        payload = (directory / PRIOR_NPZ).read_bytes()
        arrays = np.load(io.BytesIO(payload), allow_pickle=False)
        species = tuple(str(s) for s in arrays["species"])
        points, days, offsets = arrays["points"], arrays["days"], arrays["offsets"]
        bandwidth, season = arrays["bandwidth_km"], arrays["season_days"]
    except (OSError, ValueError, KeyError) as exc:
        raise PriorError(f"cannot read the prior in {directory}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise PriorError(f"{directory}: format {meta.get('format')!r}, expected {FORMAT!r}")
    version = hashlib.sha256(payload).hexdigest()[:16]
    if meta.get("version") != version:
        raise PriorError(f"{directory}: {PRIOR_NPZ} does not match {PRIOR_JSON} (half-written?)")
    if (len(offsets) != len(species) + 1 or offsets[-1] != len(points)
            or len(days) != len(points) or len(bandwidth) != len(species)
            or len(season) != len(species)):
        raise PriorError(f"{directory}: inconsistent record arrays")
    return SpaceSeasonPrior(species, points, days, offsets, bandwidth, season, meta, version)


def relative_factor(density: np.ndarray, known: np.ndarray, background: float,
                    floor: float) -> np.ndarray:
    """Each species' density relative to an average species at that place and date.

    ``(f_s + floor * f_mean + b) / ((1 + floor) * f_mean + b)``: about 1 where
    the records say nothing (no record of anything nearby, or a species the
    prior lacks), at least ``floor / (1 + floor)`` for a species never recorded
    there, so strong visual evidence can still win.
    """
    f = np.where(known, density, 0.0)
    mean = float(f[known].mean()) if known.any() else 0.0
    factor = (f + floor * mean + background) / ((1.0 + floor) * mean + background)
    return np.where(known, factor, 1.0)
