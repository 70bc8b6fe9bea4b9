"""One distribution for an observation: several photos of one find, and its place and date.

Pure numpy over the per-photo species distributions the pipeline already
computes (``Identification.distribution``); nothing here scores a photo.

**Product** (the default). Photos of one find are evidence about one species,
so their log-probabilities add — but they show the same individual in the
same light, so ``n`` photos count as ``n / (1 + rho (n - 1))`` independent
ones (the design effect of an intra-class correlation ``rho``): each photo's
log-probability is multiplied by ``1 / (1 + rho (n - 1))``. One photo in a
set may show another organism (the shore crab behind the anemone): each
photo's distribution is a mixture ``(1 - eps) p_i + eps u`` of what it shows
and a uniform ``u``, so a photo that contradicts the others can only lower the
answer by a bounded factor. With three photos or more, photos whose posterior
probability of being off-target passes 1/2 are then left out (at most a
minority of them) and the rest recombined: a trimmed product, so that a stray
photo does not cost a confident answer the others agree on.

**Pooled**: the normalised mean embedding is scored once; its distribution
is sharpened or softened by ``1 + gamma (n - 1)``. Measured against the
product in docs/observations.md.

**Prior**: the place-and-season factor of ``server.decision.prior`` enters as
``factor ** weight``. ``rho``, ``eps``, ``gamma``, ``weight`` and the prior's
floor are fitted by ``biolit-id prior calibrate`` on validation observations
(``tools/training/observation_fit.py``); the answer is given when its probability
passes ``answer``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from biolit_id.index.core.atomic import atomic_write
from biolit_id.server.decision.prior import (
    PRIOR_DIR,
    PRIOR_JSON,
    SpaceSeasonPrior,
    Where,
    load_prior,
    relative_factor,
)

COMBINER_JSON = "combiner.json"
METHODS = ("product", "pooled")
_TINY = 1e-300


@dataclass(frozen=True)
class CombinerParams:
    method: str = "product"
    rho: float = 0.3  # correlation between photos of one observation
    outlier: float = 0.05  # probability that a photo shows another organism
    trim: bool = True  # leave out photos that are more likely off-target than not (n >= 3)
    pooled_gamma: float = 0.0
    prior_weight: float = 1.0
    prior_floor: float = 0.05
    answer: float = 0.5  # cut on the answer's probability
    fitted: dict = field(default_factory=dict, compare=False)  # provenance, fit metrics

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"combiner method must be one of {METHODS}, got {self.method!r}")

    def save(self, directory: Path) -> Path:
        Path(directory).mkdir(parents=True, exist_ok=True)
        path = Path(directory) / COMBINER_JSON
        atomic_write(path, json.dumps(asdict(self), indent=2, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, directory: Path) -> CombinerParams:
        path = Path(directory) / COMBINER_JSON
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text("utf-8"))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def digest(self) -> str:
        body = {k: v for k, v in asdict(self).items() if k != "fitted"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes) -> CombinerParams:
        return CombinerParams(**{**asdict(self), **changes})


def photo_weight(n: np.ndarray | int, rho: float) -> np.ndarray:
    """Exponent of each photo's log-probability when ``n`` photos are combined."""
    return 1.0 / (1.0 + rho * (np.maximum(np.asarray(n, dtype=np.float64), 1.0) - 1.0))


@dataclass
class Combined:
    """Batch of combined observations ([N, S] unless said otherwise)."""

    probs: np.ndarray  # with the prior, when there is one
    photos_only: np.ndarray  # before the prior
    outlier_probability: np.ndarray  # [N, K] per photo (0 for padding and single photos)
    kept: np.ndarray  # [N, K] photos that entered the final product
    weight: np.ndarray  # [N] exponent each kept photo got
    kept_count: np.ndarray  # [N]


def _uniform(allowed: np.ndarray | None, n_species: int) -> np.ndarray:
    if allowed is None:
        return np.full(n_species, 1.0 / n_species)
    allowed = np.asarray(allowed, dtype=bool)
    return allowed / max(int(allowed.sum()), 1)


def _softmax_rows(log_scores: np.ndarray) -> np.ndarray:
    top = np.max(log_scores, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    exp = np.exp(log_scores - top)
    total = exp.sum(axis=-1, keepdims=True)
    return exp / np.where(total > 0, total, 1.0)


def _product(log_mix: np.ndarray, mask: np.ndarray, rho: float) -> tuple[np.ndarray, np.ndarray]:
    n = mask.sum(axis=1)
    weight = photo_weight(n, rho)
    summed = np.where(mask[:, :, None], log_mix, 0.0).sum(axis=1)
    return weight[:, None] * summed, weight


def combine_batch(photos: np.ndarray, mask: np.ndarray, params: CombinerParams,
                  prior_factor: np.ndarray | None = None,
                  allowed: np.ndarray | None = None) -> Combined:
    """Combine padded per-photo distributions ``photos`` [N, K, S] (``mask`` [N, K]).

    ``prior_factor`` [N, S] (rows of ones where an observation has no place or
    date); ``allowed`` [S] from ``restrict_to`` (the photos' distributions are
    already zero outside it).
    """
    photos = np.asarray(photos, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    n_species = photos.shape[2]
    n = mask.sum(axis=1)
    u = _uniform(allowed, n_species)
    eps = np.where(n >= 2, params.outlier, 0.0)[:, None, None]  # a lone photo is the find
    mix = (1.0 - eps) * photos + eps * u
    with np.errstate(divide="ignore"):
        log_mix = np.log(mix)
    log_q, weight = _product(log_mix, mask, params.rho)
    q = _softmax_rows(log_q)
    off = _off_target(photos, log_mix, mask, params, u)
    kept = mask.copy()
    if params.trim:
        kept = _trim(off, mask, n)
        if (kept != mask).any():
            log_q, weight = _product(log_mix, kept, params.rho)
            q = _softmax_rows(log_q)
    photos_only = q
    probs = q
    if prior_factor is not None and params.prior_weight != 0.0:
        with np.errstate(divide="ignore"):
            log_prior = params.prior_weight * np.log(np.maximum(prior_factor, _TINY))
        with np.errstate(divide="ignore"):
            probs = _softmax_rows(np.log(q) + log_prior)
    return Combined(probs, photos_only, off, kept, weight, kept.sum(axis=1))


def _off_target(photos: np.ndarray, log_mix: np.ndarray, mask: np.ndarray,
                params: CombinerParams, u: np.ndarray) -> np.ndarray:
    """[N, K] P(photo i shows another organism | the other photos).

    The others' combination ``q_-i`` predicts photo i, if it shows the same
    species, with Bayes factor ``sum_s q_-i(s) p_i(s) / u(s)`` against an
    off-target photo (whose likelihood does not depend on the species).
    """
    n = mask.sum(axis=1)
    eps = params.outlier
    if eps <= 0.0:
        return np.zeros(mask.shape)
    w_rest = photo_weight(n - 1, params.rho)[:, None, None]
    total = np.where(mask[:, :, None], log_mix, 0.0).sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):  # -inf - -inf: a species no photo allows
        rest = total - np.where(mask[:, :, None], log_mix, 0.0)
    q_rest = _softmax_rows(w_rest * np.where(np.isnan(rest), -np.inf, rest))
    ratio = np.where(u > 0, photos / np.where(u > 0, u, 1.0), 0.0)
    bayes = np.einsum("nks,nks->nk", q_rest, ratio)
    off = eps / (eps + (1.0 - eps) * bayes)
    return np.where(mask & (n >= 2)[:, None], off, 0.0)


def _trim(off: np.ndarray, mask: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Leave out the photos most likely off-target (> 1/2), a minority at most, n >= 3."""
    kept = mask.copy()
    most = np.maximum((n - 1) // 2, 0)
    order = np.argsort(-off, axis=1, kind="stable")
    for rank in range(off.shape[1]):
        rows = np.arange(len(off))
        col = order[:, rank]
        drop = (n >= 3) & (rank < most) & (off[rows, col] > 0.5) & mask[rows, col]
        kept[rows[drop], col[drop]] = False
    return kept


def combine(photos: np.ndarray, params: CombinerParams, prior_factor: np.ndarray | None = None,
            allowed: np.ndarray | None = None) -> Combined:
    """One observation: ``photos`` [n, S] -> a one-row ``Combined``."""
    photos = np.asarray(photos, dtype=np.float64)
    mask = np.ones((1, len(photos)), dtype=bool)
    factor = None if prior_factor is None else np.asarray(prior_factor)[None, :]
    return combine_batch(photos[None], mask, params, factor, allowed)


def pooled_embedding(embeddings: np.ndarray) -> np.ndarray:
    """The normalised mean of unit embeddings (one row)."""
    mean = np.asarray(embeddings, dtype=np.float64).mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def temper_pooled(pooled: np.ndarray, n: np.ndarray, params: CombinerParams,
                  prior_factor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(with prior, photos only) from the pooled embedding's distribution [N, S]."""
    exponent = 1.0 + params.pooled_gamma * (np.asarray(n, dtype=np.float64) - 1.0)
    with np.errstate(divide="ignore"):
        log_p = np.log(np.asarray(pooled, dtype=np.float64))
    photos_only = _softmax_rows(np.maximum(exponent, 0.05)[:, None] * log_p)
    if prior_factor is None or params.prior_weight == 0.0:
        return photos_only, photos_only
    with np.errstate(divide="ignore"):
        log_q = np.log(photos_only) + params.prior_weight * np.log(
            np.maximum(prior_factor, _TINY))
    return _softmax_rows(log_q), photos_only


@dataclass(frozen=True)
class ObservationSetup:
    """The fitted combiner and, when there is one, the prior; ``version`` names both."""

    params: CombinerParams = field(default_factory=CombinerParams)
    prior: SpaceSeasonPrior | None = None
    folder: Path | None = None
    version: str = ""


def load_observation_setup(bundle_dir: Path | None, data_dir: Path) -> ObservationSetup:
    """``BUNDLE/prior/`` when it has a prior or a combiner, else ``DATA_DIR/prior/``."""
    candidates = ([Path(bundle_dir) / PRIOR_DIR] if bundle_dir else []) + [
        Path(data_dir) / PRIOR_DIR]
    for folder in candidates:
        has_prior = (folder / PRIOR_JSON).is_file()
        if has_prior or (folder / COMBINER_JSON).is_file():
            prior = load_prior(folder) if has_prior else None  # PriorError: refuse to start
            params = CombinerParams.load(folder)
            body = f"{prior.version if prior else ''}/{params.digest()}"
            return ObservationSetup(params, prior, folder,
                                    hashlib.sha256(body.encode()).hexdigest()[:16])
    return ObservationSetup()


def prior_factor(setup: ObservationSetup, names: Sequence[str], where: Where | None,
                 day: float | None) -> np.ndarray | None:
    """Each species' place-and-season factor, None where there is nothing to apply."""
    if setup.prior is None or (where is None and day is None):
        return None
    density, known, background = setup.prior.densities(names, where, day)
    return relative_factor(density, known, background, setup.params.prior_floor)
