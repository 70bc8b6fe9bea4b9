"""Choosing a bundle's decision family out of fold: no choice is judged on rows it was fit on.

The fitting rows (train + validation, less the calibration fold that only the
thresholds see) are cut into K stratified folds. Each fold's photos are scored
by a whitening, prototypes and a head fitted on the other folds, so every row
has out-of-fold components. Each candidate family is a constrained form of the
served log-linear model (``server.decision.fused.fused_logits``); its weights
are fitted, species weighted equally, on the out-of-fold rows of the other
folds, so the table that chooses among families is itself out of fold. The
head of a family is the MLP or shrinkage LDA (``training/lda.py``, served as a
head with no hidden layer). Exemplar kNN, which the service cannot serve for
trained species (their photos are not in its gallery), is scored the same way
for the table only. Criterion and numbers: docs/quality.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from biolit_id.cli.training.calibration_metrics import ece
from biolit_id.cli.training.datasets import EmbeddingSet
from biolit_id.cli.training.features import fit_whitening
from biolit_id.cli.training.lda import LDA_SHRINKAGE, lda_discriminants
from biolit_id.index.core.vectors import (
    SEED_ITERATIONS,
    class_prototypes,
    fuse_prototypes,
    l2_normalize,
)
from biolit_id.server.decision.fused import FusionWeights, fused_logits, log_softmax
from biolit_id.server.decision.rules import masked_softmax

log = logging.getLogger(__name__)

FOLDS = 5
CALIBRATION_SHARE = 0.2
CALIBRATION_MIN_PHOTOS = 5  # a species with fewer keeps every photo for fitting
EARLY_STOPPING_SHARE = 0.15
TARGET_COVERAGE = 0.88
PROTOTYPE_ITERATIONS = (0, SEED_ITERATIONS)  # class means, or the seed's weighted refinement
KNN_K = 3

HeadFit = Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]


# ------------------------------------------------------------ splits


def stratified_share(y: np.ndarray, share: float, min_photos: int, seed: int) -> np.ndarray:
    """[n] bool: ``share`` of each species' rows (at least one) for species with at least
    ``min_photos``; the others keep every row on the other side."""
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if len(rows) >= min_photos:
            keep[rng.choice(rows, max(1, round(share * len(rows))), replace=False)] = True
    return keep


def calibration_rows(y: np.ndarray, seed: int = 0) -> np.ndarray:
    """[n] bool: the calibration fold, kept apart from every fit but the thresholds."""
    return stratified_share(y, CALIBRATION_SHARE, CALIBRATION_MIN_PHOTOS, seed + 104729)


def fitting_and_calibration(train: EmbeddingSet, val: EmbeddingSet, seed: int
                            ) -> tuple[EmbeddingSet, EmbeddingSet]:
    """Train and validation pooled, then cut into the rows that fit everything and the
    stratified calibration fold only ``calibrate`` sees."""
    pool = train.concat(val)
    index = {s: i for i, s in enumerate(sorted(set(pool.species)))}
    kept = calibration_rows(np.array([index[s] for s in pool.species], dtype=np.int64), seed)
    return pool.subset(np.flatnonzero(~kept)), pool.subset(np.flatnonzero(kept))


def early_stopping_rows(y: np.ndarray, seed: int = 0) -> np.ndarray:
    """[n] bool: the rows a head is early-stopped on (never trained on)."""
    return stratified_share(y, EARLY_STOPPING_SHARE, 2, seed + 15485863)


def stratified_folds(y: np.ndarray, k: int = FOLDS, seed: int = 0) -> np.ndarray:
    """[n] fold of each row; each species' rows dealt round-robin from a random start."""
    rng = np.random.default_rng(seed + 7)
    fold = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        fold[rows] = (np.arange(len(rows)) + rng.integers(k)) % k
    return fold


# ------------------------------------------------------------ out-of-fold components


@dataclass
class OutOfFold:
    """Each fitting row scored by components fitted without its fold."""

    cos: np.ndarray  # [n, S] cosine to the fused prototypes (the chosen recipe)
    head_logits: np.ndarray  # [n, C] the MLP head over ``head_ids``
    head_ids: np.ndarray  # [C] species index of each head class
    log_prior: np.ndarray  # [C] log training share of each head class
    baselines: dict[str, np.ndarray]  # name -> [n, S] finite scores (not served)
    y: np.ndarray  # [n]
    fold: np.ndarray  # [n]
    cos_by_iterations: dict[int, np.ndarray] | None = None  # each prototype recipe's cosines
    prototype_iterations: int = 0
    lda_logits: np.ndarray | None = None  # [n, C] the LDA head over ``head_ids``

    def head(self, kind: str) -> np.ndarray:
        return self.lda_logits if kind == "lda" else self.head_logits


def _whitening(x: np.ndarray, pca_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """``(v - mu) @ W`` fitted on ``x``, before the prototypes' normalisation."""
    mu, w, _ = fit_whitening(x, pca_dim)
    return lambda v: (np.asarray(v, np.float64) - mu) @ w


def lda_head_logits(train_z: np.ndarray, train_y: np.ndarray, head_ids: np.ndarray,
                    query_z: np.ndarray) -> np.ndarray:
    """[n, C] the served LDA head's logits (``lda.lda_head_state``) over ``head_ids``."""
    cidx = {int(c): i for i, c in enumerate(head_ids)}
    rows = np.isin(train_y, head_ids)
    yy = np.array([cidx[int(v)] for v in train_y[rows]], dtype=np.int64)
    a, bias = lda_discriminants(train_z[rows], yy, len(head_ids), LDA_SHRINKAGE)
    return query_z @ a + bias


def knn_scores(train_w: np.ndarray, train_y: np.ndarray, n_species: int, query_w: np.ndarray,
               k: int = KNN_K) -> np.ndarray:
    """Mean cosine of each query to the ``k`` nearest photos of each species."""
    sims = query_w @ train_w.T
    out = np.full((len(query_w), n_species), -1.0)
    for c in np.unique(train_y):
        s = sims[:, train_y == c]
        kk = min(k, s.shape[1])
        out[:, c] = -np.sort(-s, axis=1)[:, :kk].mean(axis=1)
    return out


def out_of_fold(x: np.ndarray, y: np.ndarray, n_species: int, head_ids: Sequence[int],
                fit_head: HeadFit, text_raw: np.ndarray, alpha: float, pca_dim: int,
                iterations: Sequence[int] = PROTOTYPE_ITERATIONS, folds: int = FOLDS,
                seed: int = 0) -> OutOfFold:
    """Every row's components from a whitening, prototypes and head fitted on other folds;
    prototypes by each recipe in ``iterations`` (0: class means; n: the seed's n
    similarity-weighted refinements)."""
    fold = stratified_folds(y, folds, seed)
    head_ids = np.asarray(head_ids, dtype=np.int64)
    cos_by = {int(it): np.zeros((len(y), n_species)) for it in iterations}
    head = np.zeros((len(y), len(head_ids)))
    lda = np.zeros((len(y), len(head_ids)))
    baselines = {"knn": np.zeros((len(y), n_species))}
    for k in range(folds):
        tr, te = fold != k, fold == k
        if not te.any():
            continue
        whiten = _whitening(x[tr], pca_dim)
        train_z, query_z = whiten(x[tr]), whiten(x[te])
        train_w, query_w = l2_normalize(train_z), l2_normalize(query_z)
        text_w = l2_normalize(whiten(text_raw))
        for it, cos in cos_by.items():
            visual = class_prototypes(train_w, y[tr], n_species, it)
            cos[te] = query_w @ fuse_prototypes(visual, text_w, alpha).astype(np.float64).T
        if len(head_ids):
            head[te] = fit_head(x[tr], y[tr])(x[te])
            lda[te] = lda_head_logits(train_z, y[tr], head_ids, query_z)
        baselines["knn"][te] = knn_scores(train_w, y[tr], n_species, query_w)
        log.info("cross-fitting: fold %d/%d scored", k + 1, folds)
    counts = np.bincount(y, minlength=n_species).astype(np.float64)
    log_prior = (np.log(np.maximum(counts[head_ids], 1.0) / max(counts[head_ids].sum(), 1.0))
                 if len(head_ids) else np.zeros(0))
    baselines = {name: _finite(scores) for name, scores in baselines.items()}
    first = next(iter(cos_by))
    return OutOfFold(cos_by[first], head, head_ids, log_prior, baselines, y, fold, cos_by, first,
                     _finite(lda) if len(head_ids) else lda)


# ------------------------------------------------------------ families


@dataclass(frozen=True)
class Family:
    """A constrained fused model: ``weights(theta)`` maps its free parameters to weights."""

    name: str
    start: tuple[float, ...]
    weights: Callable[[np.ndarray], FusionWeights]
    needs_head: bool = False
    servable: bool = True
    head: str = "mlp"  # which head its head terms use: "mlp" or "lda"


def _w(proto=0.0, head=0.0, prior=0.0, novel_proto=0.0, novel_offset=0.0) -> FusionWeights:
    return FusionWeights(proto=float(proto), head=float(head), prior=float(prior),
                         novel_proto=float(novel_proto), novel_knn=0.0,
                         novel_offset=float(novel_offset))


FAMILIES: tuple[Family, ...] = (
    # Class-mean cosine, one temperature: every species alike, runtime ones included.
    Family("cosine", (10.0,), lambda t: _w(proto=t[0], novel_proto=t[0])),
    Family("cosine+prior", (10.0, 0.5), lambda t: _w(proto=t[0], novel_proto=t[0],
                                                      prior=t[1])),
    # The head for its species; the others by their prototype, at a fitted level.
    Family("head", (1.0, 10.0, -3.0),
           lambda t: _w(head=t[0], novel_proto=t[1], novel_offset=t[2]), needs_head=True),
    Family("head+prior", (1.0, 10.0, -3.0, 0.5),
           lambda t: _w(head=t[0], novel_proto=t[1], novel_offset=t[2], prior=t[3]),
           needs_head=True),
    Family("fused", (10.0, 1.0, 10.0, -3.0),
           lambda t: _w(proto=t[0], head=t[1], novel_proto=t[2], novel_offset=t[3]),
           needs_head=True),
    Family("fused+prior", (10.0, 1.0, 10.0, -3.0, 0.5),
           lambda t: _w(proto=t[0], head=t[1], novel_proto=t[2], novel_offset=t[3],
                        prior=t[4]), needs_head=True),
    # Shrinkage LDA as the head, alone and beside the prototypes.
    Family("lda", (1.0, 10.0, -3.0),
           lambda t: _w(head=t[0], novel_proto=t[1], novel_offset=t[2]), needs_head=True,
           head="lda"),
    Family("cosine+lda", (10.0, 1.0, 10.0, -3.0),
           lambda t: _w(proto=t[0], head=t[1], novel_proto=t[2], novel_offset=t[3]),
           needs_head=True, head="lda"),
)


def family_logits(family: Family, theta: np.ndarray, oof: OutOfFold, rows: np.ndarray
                  ) -> np.ndarray:
    """[len(rows), S] logits of a family on some out-of-fold rows."""
    if not family.servable:
        return theta[0] * oof.baselines[family.name][rows]
    logits = oof.head(family.head)[rows]
    head_lp = log_softmax(logits) if len(oof.head_ids) else logits
    return fused_logits(oof.cos[rows], head_lp, oof.head_ids, oof.log_prior, None,
                        family.weights(theta))


def _finite(scores: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(scores), scores, np.nanmin(np.where(
        np.isfinite(scores), scores, np.nan)) - 50.0)


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """1 / photos of the row's species, mean 1: every species counts the same."""
    counts = np.bincount(y)
    w = 1.0 / counts[y]
    return w * len(y) / w.sum()


def fit_family(family: Family, oof: OutOfFold, rows: np.ndarray) -> np.ndarray:
    """The family's parameters minimising the species-balanced NLL on ``rows``."""
    y = oof.y[rows]
    weight = balanced_weights(y)

    def loss(theta: np.ndarray) -> float:
        z = family_logits(family, theta, oof, rows)
        lp = z - z.max(axis=1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(axis=1, keepdims=True))
        return float(-(weight * lp[np.arange(len(y)), y]).mean())

    result = optimize.minimize(loss, np.asarray(family.start, dtype=np.float64),
                               method="L-BFGS-B", options={"maxiter": 200})
    return result.x


def baseline_family(name: str) -> Family:
    return Family(name, (10.0,), lambda t: _w(), servable=False)


# ------------------------------------------------------------ criteria


def at_coverage(probs: np.ndarray, y: np.ndarray, rare: np.ndarray,
                coverage: float = TARGET_COVERAGE) -> dict[str, float]:
    """Accuracy of the most confident photos making up ``coverage``: plain, species-balanced
    (the criterion) and on rare species; the balanced area under the risk-coverage curve."""
    w = balanced_weights(y)
    order = np.argsort(-probs.max(axis=1), kind="stable")
    right = probs.argmax(axis=1) == y
    k = max(1, int(np.ceil(coverage * len(y))))
    sel = order[:k]
    cum_w = np.cumsum(w[order]) / w.sum()
    bsel = order[: int(np.searchsorted(cum_w, coverage)) + 1]
    wrong_w = (~right[order]) * w[order]
    risk = np.cumsum(wrong_w) / np.cumsum(w[order])
    rare_sel = sel[rare[y[sel]]]
    return {"balanced_accuracy": float((w[bsel] * right[bsel]).sum() / w[bsel].sum()),
            "balanced_aurc": float((risk * w[order]).sum() / w.sum()),
            "accuracy": float(right[sel].mean()),
            "rare_accuracy": float(right[rare_sel].mean()) if len(rare_sel) else float("nan")}


def nested_probabilities(family: Family, oof: OutOfFold) -> np.ndarray:
    """[n, S] each fold's rows under parameters fitted on the other folds' rows."""
    probs = np.zeros_like(oof.cos)
    for k in np.unique(oof.fold):
        inside, outside = oof.fold != k, oof.fold == k
        theta = fit_family(family, oof, inside)
        probs[outside] = masked_softmax(family_logits(family, theta, oof, outside), None)
    return probs


@dataclass
class FamilyChoice:
    name: str
    weights: FusionWeights
    table: list[dict]
    prototype_iterations: int
    needs_head: bool  # False: runtime species are scored as trained ones (tied weights)
    head: str = "mlp"  # the head the bundle serves: "mlp" or "lda"

    def to_json(self) -> dict:
        return {"chosen": self.name, "head": self.head,
                "prototype_iterations": self.prototype_iterations,
                "criterion": f"species-balanced accuracy at coverage {TARGET_COVERAGE} "
                             "(out of fold, nested)", "table": self.table}


def table_row(name: str, servable: bool, probs: np.ndarray, oof: OutOfFold, rare: np.ndarray
              ) -> dict:
    right = probs.argmax(axis=1) == oof.y
    p_true = probs[np.arange(len(oof.y)), oof.y]
    row = {"family": name, "served": servable, **at_coverage(probs, oof.y, rare),
           "top1": float(right.mean()),
           "nll": float(-np.log(np.maximum(p_true, 1e-12)).mean()),
           "ece": ece(probs.max(axis=1), right)}
    log.info("out of fold: %-22s balanced accuracy@%.2f %.3f", name, TARGET_COVERAGE,
             row["balanced_accuracy"])
    return row


def choose_family(oof: OutOfFold, rare: np.ndarray, with_head: bool = True) -> FamilyChoice:
    """Every candidate scored out of fold; the best servable one, fitted on all rows.

    The prototype recipe is chosen first, by the cosine family alone; every other
    family then uses the chosen prototypes."""
    table = []
    recipes = oof.cos_by_iterations or {oof.prototype_iterations: oof.cos}
    best_recipe = None
    for it, cos in recipes.items():
        oof.cos, oof.prototype_iterations = cos, it
        row = table_row(f"cosine (iterations {it})", True,
                        nested_probabilities(FAMILIES[0], oof), oof, rare)
        table.append(row)
        if best_recipe is None or row["balanced_accuracy"] > best_recipe[1] + 1e-4:
            best_recipe = (it, row["balanced_accuracy"])
    oof.prototype_iterations = best_recipe[0]
    oof.cos = recipes[best_recipe[0]]
    candidates = [f for f in FAMILIES if with_head or not f.needs_head]
    baselines = [baseline_family(name) for name in oof.baselines]
    every_row = np.ones(len(oof.y), dtype=bool)
    for family in (*candidates, *baselines):
        probs = nested_probabilities(family, oof)
        row = table_row(family.name, family.servable, probs, oof, rare)
        if family.servable:  # fitted on every row: what the bundle serves if it is chosen
            scale = sharpening(probs, oof.y)
            weights = scaled(family.weights(fit_family(family, oof, every_row)), scale)
            row.update(head=family.head, needs_head=family.needs_head, scale=scale,
                       weights=weights.to_json())
        table.append(row)
    servable = [row for row in table[len(recipes):] if row["served"]]
    # Ties go to the simpler candidate (the tuple's order): the prior only when it wins.
    best = max(servable, key=lambda row: (round(row["balanced_accuracy"], 4),
                                          -servable.index(row)))
    return FamilyChoice(best["family"], FusionWeights.from_json(best["weights"]), table,
                        oof.prototype_iterations, best["needs_head"], best["head"])


def sharpening(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature ``s`` (softmax of ``s * log p``) that makes the out-of-fold top answer's
    probability match how often it is right (binary cross-entropy of the top label).

    The weights are fitted species-balanced, which leaves the probability shown with
    an answer too low for the photos people send (docs/quality.md, "How the decision is
    chosen").
    """
    log_p = np.log(np.maximum(probs, 1e-300))
    rows = np.arange(len(y))

    def loss(log_s: float) -> float:
        z = np.exp(log_s) * log_p
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        top = p.argmax(axis=1)
        conf = np.clip(p[rows, top], 1e-9, 1 - 1e-9)
        right = top == y
        return float(-np.where(right, np.log(conf), np.log1p(-conf)).mean())

    found = optimize.minimize_scalar(loss, bounds=(np.log(0.25), np.log(4.0)), method="bounded")
    return float(np.exp(found.x))


def scaled(weights: FusionWeights, scale: float) -> FusionWeights:
    """Every weight times ``scale``: the fused logits are linear in them, so the
    distribution becomes softmax(scale * logits)."""
    return FusionWeights.from_json({k: v * scale for k, v in weights.to_json().items()})


def family_lines(table: list[dict], chosen: str) -> list[str]:
    """The out-of-fold table as ``train`` and ``calibrate`` print it."""
    lines = [f"  {'family':13s} {'served':6s} {'bal.acc':>7s} {'acc':>6s} {'rare':>6s} "
             f"{'top1':>6s} {'NLL':>6s} {'ECE':>6s}   (out of fold, at coverage "
             f"{TARGET_COVERAGE})"]
    for row in table:
        mark = " <- chosen" if row["family"] == chosen else ""
        lines.append(f"  {row['family']:13s} {'yes' if row['served'] else 'no':6s} "
                     f"{row['balanced_accuracy']:7.3f} {row['accuracy']:6.3f} "
                     f"{row['rare_accuracy']:6.3f} {row['top1']:6.3f} {row['nll']:6.3f} "
                     f"{row['ece']:6.3f}{mark}")
    return lines
