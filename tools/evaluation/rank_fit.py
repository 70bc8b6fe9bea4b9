"""Rank thresholds fitted on a scored, labelled set (calibrate and the quality bench)."""

from __future__ import annotations

import numpy as np

from biolit_id.cli.evaluation.metrics import ScoredSet, rank_answers
from biolit_id.cli.training.rank_thresholds import answer_arrays, fit_mean_precision
from biolit_id.server.catalog.catalog import Catalog

DEFAULT_TAXON_PRECISION = 0.90  # also the default of calibrate --taxon-precision


def fit_taxon_thresholds(scored: ScoredSet, species: list[str], catalog: Catalog,
                         precision: float = DEFAULT_TAXON_PRECISION) -> tuple[dict[str, float],
                                                                               dict]:
    """Per rank, finest first, on the photos no finer rank has answered: the lowest mass
    (>= 0.5) whose answers' MEAN precision is certified >= ``precision`` (a Clopper–Pearson
    lower bound, tools/training/rank_thresholds.py), as ``decision.ranks.taxon_fallback``
    walks the ranks at serving."""
    rejected = np.flatnonzero(~scored.accepted)
    answers = rank_answers(scored, rejected, catalog)
    truths = [species[int(i)] for i in rejected]
    masses, right = answer_arrays(answers, truths, catalog)
    fits = fit_mean_precision(masses, right, precision)
    thresholds = {rank: fit.threshold for rank, fit in fits.items() if fit.threshold is not None}
    return thresholds, {"rejected": len(rejected), "precision_target": precision,
                        "rule": "mean precision, Clopper-Pearson lower bound",
                        "ranks": {rank: fit.report() for rank, fit in fits.items()}}
