"""Scoring labelled observations with a bundle, and fitting the combiner on them.

Per-photo distributions come from the bundle's own scorer (``scorer_for``,
what ``serve`` uses), the combination from ``server.decision.observations`` and the
place-and-season densities from ``server.decision.prior``: the fit and the evaluation
measure what the service answers. Parameters are chosen by grid search on
the negative log-likelihood of the true species (a proper scoring rule, so
the fitted answers stay calibrated): ``rho``/``outlier`` (and ``pooled_gamma``)
on observations of two photos or more, then the prior's ``weight`` and floor
on observations with a place or a date.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from biolit_id.cli.training.observation_data import ObservationSet
from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.decision.bundle import Bundle
from biolit_id.server.decision.observations import (
    CombinerParams,
    combine_batch,
    pooled_embedding,
    temper_pooled,
)
from biolit_id.server.decision.prior import SpaceSeasonPrior, Where, relative_factor
from biolit_id.server.decision.registry import scorer_for

RHO_GRID = np.round(np.linspace(0.0, 1.0, 21), 3)
OUTLIER_GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
GAMMA_GRID = np.round(np.linspace(-0.5, 2.0, 26), 3)
WEIGHT_GRID = np.round(np.linspace(0.0, 2.0, 21), 3)
FLOOR_GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


@dataclass
class ScoredObservations:
    data: ObservationSet
    names: tuple[str, ...]
    truth: np.ndarray  # [N] species index, -1 when the bundle does not know it
    photo_probs: np.ndarray  # [M, S] each photo's distribution
    pooled_probs: np.ndarray  # [N, S] the mean embedding's distribution
    density: np.ndarray | None  # [N, S] prior density (NaN: species without records)
    known: np.ndarray | None  # [N, S]
    background: np.ndarray | None  # [N]

    def prior_factors(self, floor: float) -> np.ndarray | None:
        """[N, S] factors; rows of ones for observations without place or date."""
        if self.density is None:
            return None
        out = np.ones(self.pooled_probs.shape)
        for i in np.flatnonzero(~np.isnan(self.background)):
            out[i] = relative_factor(self.density[i], self.known[i], self.background[i], floor)
        return out


def score_observations(bundle: Bundle, data: ObservationSet,
                       prior: SpaceSeasonPrior | None) -> ScoredObservations:
    scorer = scorer_for(bundle)
    protos = PrototypeSet(tuple(bundle.species), bundle.prototypes.astype(np.float32))
    index = protos.index()
    truth = np.array([index.get(s, -1) for s in data.species], dtype=np.int64)
    photo_probs = _distribution(scorer, protos, data.embeddings)
    pooled = np.stack([pooled_embedding(data.embeddings[data.owner == i])
                       for i in range(len(data))]) if len(data) else data.embeddings[:0]
    pooled_probs = _distribution(scorer, protos, pooled)
    density = known = background = None
    if prior is not None:
        n, s = len(data), len(protos.names)
        density, known = np.full((n, s), np.nan), np.zeros((n, s), dtype=bool)
        background = np.full(n, np.nan)
        for i in range(n):
            where = (Where(data.latitude[i], data.longitude[i], data.uncertainty_km[i])
                     if not np.isnan(data.latitude[i]) else None)
            day = None if np.isnan(data.day[i]) else float(data.day[i])
            if where is None and day is None:
                continue
            density[i], known[i], background[i] = prior.densities(protos.names, where, day)
    return ScoredObservations(data, protos.names, truth, photo_probs, pooled_probs,
                              density, known, background)


def _distribution(scorer, protos: PrototypeSet, embeddings: np.ndarray,
                  batch: int = 4096) -> np.ndarray:
    parts = [scorer.score(np.asarray(embeddings[i:i + batch], dtype=np.float32),
                          protos).distribution for i in range(0, len(embeddings), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, len(protos.names)))


def nll(probs: np.ndarray, truth: np.ndarray) -> float:
    keep = truth >= 0
    if not keep.any():
        return 0.0
    p = probs[keep, truth[keep]]
    return float(-np.log(np.maximum(p, 1e-12)).mean())


# ---------------------------------------------------------------- the fit


def fit_combiner(scored: ScoredObservations, base: CombinerParams | None = None,
                 ) -> CombinerParams:
    """``rho``, ``outlier``, ``pooled_gamma``, then the prior's weight and floor."""
    base = base or CombinerParams()
    data = scored.data
    multi = data.counts >= 2
    photos, mask = data.padded(scored.photo_probs)
    fitted: dict = {"observations": len(data), "multi_photo": int(multi.sum()),
                    "fitted_on": dt.date.today().isoformat()}
    params = base
    if multi.sum() >= 10:
        best = None
        for rho in RHO_GRID:
            for eps in OUTLIER_GRID:
                trial = params.replace(rho=float(rho), outlier=float(eps))
                q = combine_batch(photos[multi], mask[multi], trial).photos_only
                score = nll(q, scored.truth[multi])
                if best is None or score < best[0]:
                    best = (score, float(rho), float(eps))
        params = params.replace(rho=best[1], outlier=best[2])
        fitted["nll_product_multi"] = best[0]
        gammas = [(nll(temper_pooled(scored.pooled_probs[multi], data.counts[multi],
                                     params.replace(pooled_gamma=float(g)))[1],
                       scored.truth[multi]), float(g)) for g in GAMMA_GRID]
        score, gamma = min(gammas)
        params = params.replace(pooled_gamma=gamma)
        fitted["nll_pooled_multi"] = score
    if scored.density is not None:
        with_prior = ~np.isnan(scored.background)
        if with_prior.sum() >= 10:
            q = combine_batch(photos, mask, params).photos_only[with_prior]
            truth = scored.truth[with_prior]
            fitted["nll_photos_only"] = nll(q, truth)
            best = None
            log_q = np.log(np.maximum(q, 1e-300))
            for floor in FLOOR_GRID:
                log_f = np.log(np.maximum(scored.prior_factors(floor)[with_prior], 1e-300))
                for weight in WEIGHT_GRID:
                    z = log_q + weight * log_f
                    z = z - z.max(axis=1, keepdims=True)
                    p = np.exp(z)
                    p /= p.sum(axis=1, keepdims=True)
                    score = nll(p, truth)
                    if best is None or score < best[0]:
                        best = (score, float(weight), float(floor))
            params = params.replace(prior_weight=best[1], prior_floor=best[2])
            fitted["nll_with_prior"] = best[0]
    return params.replace(fitted={**base.fitted, **fitted})


# ---------------------------------------------------------------- configurations


def configuration(scored: ScoredObservations, params: CombinerParams, photos: str,
                  use_prior: bool) -> np.ndarray:
    """[N, S] observation distributions: photos "first", "all", "on_target" or "pooled"."""
    data = scored.data
    factors = scored.prior_factors(params.prior_floor) if use_prior else None
    if photos == "pooled":
        return temper_pooled(scored.pooled_probs, data.counts, params, factors)[0]
    select = {"first": data.first_photos(), "all": None, "on_target": data.on_target}[photos]
    padded, mask = data.padded(scored.photo_probs, select)
    return combine_batch(padded, mask, params, factors).probs
