"""SYNTHETIC observations to try the combiner and the prior on (``biolit-id prior synth``).

Nothing here is real data. Names are catalog species so that taxonomy and
``restrict_to`` work, but their ranges, seasons and looks are invented:

* ``range``: look-alike pairs living apart (Channel/Atlantic vs Mediterranean),
  where place should settle what the photos cannot;
* ``season``: look-alike pairs on the same shores at opposite seasons;
* ``cooccurring``: look-alike pairs sharing range and season (the prior has
  no information between them);
* ``distinct``: species nothing else resembles.

A photo's embedding is ``normalize(mu_s + o + sigma z)``, ``z ~ N(0, I/D)``;
independent photos have ``o = 0``, correlated ones share one offset per
observation, ``o ~ N(0, (sigma/2)^2 I/D)`` (half the species' spread).
Observations have 1-5 photos, of which the 2nd and later are off-target
(another species) with probability ``off_target``. The bundle is the
prototypes ``mu_s`` with a temperature fitted on validation photos.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biolit_id.cli.training.observation_data import write_observations
from biolit_id.server.decision.bundle import DEFAULT_HEAD, Bundle
from biolit_id.server.decision.types import Thresholds

KM_PER_DEGREE = 111.2
REGIONS: dict[str, tuple[tuple[float, float], ...]] = {  # coastal towns, (lat, lon)
    "channel": ((48.73, -3.98), (48.65, -2.01), (49.64, -1.62), (49.49, 0.11),
                (49.92, 1.08), (50.73, 1.61)),
    "atlantic": ((48.39, -4.49), (47.87, -3.92), (46.16, -1.15), (44.66, -1.17),
                 (43.48, -1.56)),
    "mediterranean": ((42.48, 3.13), (43.40, 3.70), (43.30, 5.37), (43.12, 5.93),
                      (43.70, 7.27)),
}
NORTH = ("channel", "atlantic")
SPREAD = 7.0  # sigma: a photo's noise norm, against unit prototypes
EVERYWHERE = ("channel", "atlantic", "mediterranean")


@dataclass(frozen=True)
class SpeciesSpec:
    name: str
    role: str
    regions: tuple[str, ...]
    peak_day: float | None = None  # day of year; None: all year
    lookalike: str | None = None  # the species it was made to resemble


def _pair(a: str, b: str, role: str, regions_a, regions_b, peak_a=None, peak_b=None):
    return [SpeciesSpec(a, role, regions_a, peak_a), SpeciesSpec(b, role, regions_b, peak_b, a)]


SPECIES: tuple[SpeciesSpec, ...] = tuple(
    _pair("Actinia equina", "Actinia mediterranea", "range", NORTH, ("mediterranean",))
    + _pair("Patella vulgata", "Patella caerulea", "range", NORTH, ("mediterranean",))
    + _pair("Mytilus edulis", "Mytilus galloprovincialis", "range", ("channel",),
            ("mediterranean",))
    + _pair("Phorcus lineatus", "Phorcus turbinatus", "range", ("atlantic",),
            ("mediterranean",))
    + _pair("Velella velella", "Physalia physalis", "season", EVERYWHERE, EVERYWHERE,
            110.0, 290.0)
    + _pair("Sargassum muticum", "Himanthalia elongata", "season", NORTH, NORTH, 200.0, 20.0)
    + _pair("Fucus serratus", "Fucus vesiculosus", "cooccurring", NORTH, NORTH)
    + _pair("Steromphala pennanti", "Steromphala umbilicalis", "cooccurring", NORTH, NORTH)
    + _pair("Xantho hydrophilus", "Xantho pilipes", "cooccurring", EVERYWHERE, EVERYWHERE)
    + [SpeciesSpec("Carcinus maenas", "distinct", EVERYWHERE),
       SpeciesSpec("Paracentrotus lividus", "distinct", ("atlantic", "mediterranean")),
       SpeciesSpec("Asterias rubens", "distinct", NORTH),
       SpeciesSpec("Hexaplex trunculus", "distinct", ("mediterranean",)),
       SpeciesSpec("Anemonia viridis", "distinct", EVERYWHERE),
       SpeciesSpec("Crepidula fornicata", "distinct", NORTH)]
)


@dataclass
class World:
    species: tuple[SpeciesSpec, ...]
    prototypes: np.ndarray  # [S, D] unit rows
    spread: float  # sigma
    correlated: bool
    seed: int

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.species]


def make_world(dim: int = 512, seed: int = 0, spread: float = SPREAD, lookalike_cos: float = 0.93,
               correlated: bool = False) -> World:
    """Prototypes: random unit vectors; each look-alike at cosine ``lookalike_cos`` to its pair."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(len(SPECIES), dim))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    index = {s.name: i for i, s in enumerate(SPECIES)}
    for i, spec in enumerate(SPECIES):
        if spec.lookalike is None:
            continue
        mu = protos[index[spec.lookalike]]
        v = protos[i] - (protos[i] @ mu) * mu
        v /= np.linalg.norm(v)
        protos[i] = lookalike_cos * mu + np.sqrt(1 - lookalike_cos**2) * v
    return World(SPECIES, protos.astype(np.float32), spread, correlated, seed)


# ---------------------------------------------------------------- place and date


def sample_place_date(spec: SpeciesSpec, rng: np.random.Generator, jitter_km: float = 15.0
                      ) -> tuple[float, float, dt.date]:
    region = spec.regions[rng.integers(len(spec.regions))]
    lat, lon = REGIONS[region][rng.integers(len(REGIONS[region]))]
    lat += rng.normal(0, jitter_km) / KM_PER_DEGREE
    lon += rng.normal(0, jitter_km) / (KM_PER_DEGREE * np.cos(np.radians(lat)))
    if spec.peak_day is None:
        day = rng.uniform(0, 365)
    else:  # von Mises around the peak, std about five weeks
        day = (spec.peak_day + rng.vonmises(0.0, 3.0) * 365.25 / (2 * np.pi)) % 365
    year = int(rng.integers(2018, 2025))
    return float(lat), float(lon), dt.date(year, 1, 1) + dt.timedelta(days=int(day))


def occurrences(world: World, per_species: int = 400, vagrant: float = 0.02,
                seed: int = 1) -> dict[str, list]:
    """Darwin Core records: a few vagrants elsewhere, some without a date, authorship added."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"scientificName": [], "decimalLatitude": [],
                            "decimalLongitude": [], "eventDate": [], "basisOfRecord": []}
    for spec in world.species:
        for _ in range(per_species):
            where = spec
            if rng.random() < vagrant:
                where = SpeciesSpec(spec.name, spec.role, EVERYWHERE, spec.peak_day)
            lat, lon, date = sample_place_date(where, rng)
            out["scientificName"].append(f"{spec.name} (Synthetic, 2024)" if rng.random() < 0.3
                                         else spec.name)
            out["decimalLatitude"].append(round(lat, 5))
            out["decimalLongitude"].append(round(lon, 5))
            out["eventDate"].append("" if rng.random() < 0.05 else
                                    (f"{date.isoformat()}T10:00:00Z" if rng.random() < 0.5
                                     else date.isoformat()))
            out["basisOfRecord"].append("HUMAN_OBSERVATION")
    return out


# ---------------------------------------------------------------- photos


def photo_embeddings(world: World, species: int, count: int, rng: np.random.Generator,
                     offset: np.ndarray | None = None) -> np.ndarray:
    dim = world.prototypes.shape[1]
    noise = rng.normal(size=(count, dim)) * world.spread / np.sqrt(dim)
    x = world.prototypes[species] + noise + (0.0 if offset is None else offset)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def observations(world: World, count: int, seed: int, set_name: str = "mixed",
                 photos: tuple[int, int] = (1, 5), off_target: float = 0.1,
                 outlier_last: bool = False) -> tuple[dict[str, list], np.ndarray]:
    """Per-photo rows and embeddings; ``outlier_last``: photos-1 on target, then one other."""
    rng = np.random.default_rng(seed)
    dim = world.prototypes.shape[1]
    rows: dict[str, list] = {k: [] for k in (
        "observation_id", "species", "decimalLatitude", "decimalLongitude", "eventDate",
        "on_target", "set", "role", "kind")}
    embeddings = []
    n_species = len(world.species)
    kind = "correlated" if world.correlated else "independent"
    for i in range(count):
        s = int(rng.integers(n_species))
        spec = world.species[s]
        lat, lon, date = sample_place_date(spec, rng)
        has = rng.random()
        lat_v, lon_v = (lat, lon) if has < 0.90 else (None, None)
        date_v = date.isoformat() if has < 0.85 or has >= 0.95 else ""
        n = int(rng.integers(photos[0], photos[1] + 1))
        offset = (rng.normal(size=dim) * 0.5 * world.spread / np.sqrt(dim)
                  if world.correlated else None)
        for k in range(n):
            target = not (outlier_last and k == n - 1) if outlier_last else (
                k == 0 or rng.random() >= off_target)
            shown = s if target else int((s + rng.integers(1, n_species)) % n_species)
            # An off-target photo is another organism: it does not share the find's offset.
            embeddings.append(photo_embeddings(world, shown, 1, rng,
                                               offset if target else None)[0])
            rows["observation_id"].append(f"{set_name}-{kind}-{i:05d}")
            rows["species"].append(spec.name)
            rows["decimalLatitude"].append(lat_v)
            rows["decimalLongitude"].append(lon_v)
            rows["eventDate"].append(date_v)
            rows["on_target"].append(bool(target))
            rows["set"].append(set_name)
            rows["role"].append(spec.role)
            rows["kind"].append(kind)
    return rows, np.stack(embeddings)


def fit_temperature(world: World, seed: int, count: int = 3000) -> float:
    """The bundle's temperature: NLL-best scale of cosine logits on validation photos."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(world.species), size=count)
    emb = np.concatenate([
        photo_embeddings(world, int(s), 1, rng,
                         rng.normal(size=world.prototypes.shape[1]) * 0.5 * world.spread
                         / np.sqrt(world.prototypes.shape[1]) if world.correlated else None)
        for s in labels])
    cos = emb.astype(np.float64) @ world.prototypes.T.astype(np.float64)
    best = None
    for t in np.geomspace(1.0, 1000.0, 121):
        z = t * cos
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        score = -logp[np.arange(count), labels].mean()
        if best is None or score < best[0]:
            best = (score, float(t))
    return best[1]


def world_bundle(world: World, temperature: float, model_id: str = "synthetic:observations",
                 fingerprint: str = "synthetic") -> Bundle:
    protos = world.prototypes
    return Bundle(
        model_id=model_id, model_fingerprint=fingerprint, embedding_dim=protos.shape[1],
        species=world.names, common=[], head_config=dict(DEFAULT_HEAD), head_state={},
        visual_prototypes=protos, text_prototypes=protos, prototypes=protos,
        whitening_mu=None, whitening_W=None, temperature=temperature, alpha=1.0,
        thresholds=Thresholds(),
        extra={"source": "SYNTHETIC observations world (tools/training/synthetic_observations.py)",
               "synthetic": True},
    )


def write_world(out: Path, dim: int = 512, seed: int = 0, correlated: bool = False,
                val: int = 3000, test: int = 3000, special: int = 2000, spread: float = SPREAD,
                model_id: str = "synthetic:observations", fingerprint: str = "synthetic",
                ) -> dict[str, Path]:
    """bundle/, occurrences.csv, val.parquet and test.parquet (sets mixed, three, two_plus_one)."""
    import pandas as pd

    out = Path(out)
    world = make_world(dim, seed, spread=spread, correlated=correlated)
    bundle_dir = world_bundle(world, fit_temperature(world, seed + 7), model_id,
                              fingerprint).save(out / "bundle")
    occ = out / "occurrences.csv"
    pd.DataFrame(occurrences(world, seed=seed + 1)).to_csv(occ, index=False)
    meta = {"model_id": model_id, "model_fingerprint": fingerprint, "synthetic": True,
            "kind": "correlated" if correlated else "independent"}
    rows, emb = observations(world, val, seed + 2, "validation")
    val_path = write_observations(out / "val.parquet", rows, emb, meta)
    parts = [observations(world, test, seed + 3, "mixed"),
             observations(world, special, seed + 4, "three", photos=(3, 3), off_target=0.0),
             observations(world, special, seed + 5, "two_plus_one", photos=(3, 3),
                          outlier_last=True)]
    merged = {k: [v for p in parts for v in p[0][k]] for k in parts[0][0]}
    test_path = write_observations(out / "test.parquet", merged,
                                   np.concatenate([p[1] for p in parts]), meta)
    return {"bundle": bundle_dir, "occurrences": occ, "validation": val_path, "test": test_path}
