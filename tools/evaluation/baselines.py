"""Simple decisions ``bench-quality`` sets beside ours: class-mean cosine, shrinkage LDA
and exemplar kNN.

All live in a PCA whitening fitted on the training photos (``train``'s own
``fit_whitening``), fit a temperature on validation, and answer like a calibrated
fused bundle: one cut on the answer's probability, the highest that answers
``coverage`` of the validation photos; rank answers get ``calibrate``'s own rank
thresholds fitted on the same validation photos. Nothing is fitted on test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from biolit_id.cli.evaluation.metrics import ScoredSet, fit_logit_scale
from biolit_id.cli.training.datasets import EmbeddingSet
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.rules import masked_softmax
from biolit_id.server.decision.types import Method, Routed, Scores

DEFAULT_COVERAGE = 0.88
LDA_SHRINKAGE = (0.1, 0.3, 0.6)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Baseline:
    """A linear scorer over whitened embeddings, its temperature, cut and rank thresholds."""

    name: str
    species: list[str]
    mu: np.ndarray  # [1, D]
    w: np.ndarray  # [D, d]
    weights: np.ndarray  # [d, S]
    bias: np.ndarray  # [S]
    normalise: bool  # cosine: unit whitened vectors
    temperature: float = 1.0
    cut: float = 0.0
    taxon_thresholds: dict[str, float] = field(default_factory=dict)
    fit_info: dict = field(default_factory=dict)

    def logits(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.mu) @ self.w
        if self.normalise:
            z = _unit(z)
        return z @ self.weights + self.bias

    def distribution(self, x: np.ndarray) -> np.ndarray:
        return masked_softmax(self.temperature * self.logits(x), None)

    def scored(self, x: np.ndarray, names: list[str]) -> ScoredSet:
        """The photos as a ``ScoredSet``, so evaluation and rank thresholds run the
        product's own code on this decision."""
        p = self.distribution(x)
        conf = p.max(axis=1)
        answer = np.where(conf >= self.cut, p.argmax(axis=1), -1)
        method = np.where(answer >= 0, int(Method.FUSED), int(Method.REJECTED))
        index = {s: i for i, s in enumerate(self.species)}
        scores = Scores(p_common=np.zeros((len(p), 0)), p_proto=p,
                        common_to_global=np.zeros(0, dtype=np.int64),
                        routed=Routed(method, answer, conf), distribution=p)
        truth = np.array([index.get(s, -1) for s in names], dtype=np.int64)
        return ScoredSet(scores, np.zeros((len(p), 0)), truth, tuple(self.species), None)


def _labels(data: EmbeddingSet, species: list[str]) -> np.ndarray:
    index = {s: i for i, s in enumerate(species)}
    return np.array([index.get(s, -1) for s in data.species], dtype=np.int64)


def _whitened(train: EmbeddingSet, pca_dim: int) -> tuple[np.ndarray, np.ndarray]:
    from biolit_id.cli.training.features import fit_whitening

    mu, w, _ = fit_whitening(train.embeddings, pca_dim)
    return mu.astype(np.float64), w.astype(np.float64)


def _class_means(z: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    means = np.zeros((n, z.shape[1]))
    np.add.at(means, y, z)
    return means / np.maximum(np.bincount(y, minlength=n), 1)[:, None]


def cosine(train: EmbeddingSet, pca_dim: int = 256) -> Baseline:
    """Class-mean cosine: each species' mean unit whitened photo, renormalised."""
    species = sorted(set(train.species))
    mu, w = _whitened(train, pca_dim)
    z = _unit((np.asarray(train.embeddings, np.float64) - mu) @ w)
    means = _unit(_class_means(z, _labels(train, species), len(species)))
    return Baseline("cosine", species, mu, w, means.T, np.zeros(len(species)), True)


def lda(train: EmbeddingSet, shrinkage: float, pca_dim: int = 256) -> Baseline:
    """Shrinkage LDA (``training/lda.py``), equal priors."""
    from biolit_id.cli.training.lda import lda_discriminants

    species = sorted(set(train.species))
    mu, w = _whitened(train, pca_dim)
    z = (np.asarray(train.embeddings, np.float64) - mu) @ w
    a, bias = lda_discriminants(z, _labels(train, species), len(species), shrinkage)
    return Baseline(f"lda{shrinkage:g}", species, mu, w, a, bias, False,
                    fit_info={"shrinkage": shrinkage})


@dataclass
class ExemplarKnn(Baseline):
    """Exemplar kNN: a species' score is the mean cosine of its ``k`` nearest training
    photos (unit whitened vectors)."""

    photos: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [N, d]
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [N]
    k: int = 3

    def logits(self, x: np.ndarray) -> np.ndarray:
        from biolit_id.cli.training.crossfit import knn_scores

        query = _unit((np.asarray(x, np.float64) - self.mu) @ self.w)
        return knn_scores(self.photos, self.labels, len(self.species), query, self.k)


def knn(train: EmbeddingSet, k: int = 3, pca_dim: int = 256) -> ExemplarKnn:
    species = sorted(set(train.species))
    mu, w = _whitened(train, pca_dim)
    photos = _unit((np.asarray(train.embeddings, np.float64) - mu) @ w)
    return ExemplarKnn("knn", species, mu, w, np.zeros((w.shape[1], 0)), np.zeros(0), True,
                       fit_info={"k": k}, photos=photos, labels=_labels(train, species), k=k)


def _nll(b: Baseline, x: np.ndarray, y: np.ndarray) -> float:
    p = b.distribution(x[y >= 0])
    return float(-np.log(np.maximum(p[np.arange(len(p)), y[y >= 0]], 1e-300)).mean())


def calibrated(b: Baseline, val: EmbeddingSet, catalog: Catalog,
               coverage: float = DEFAULT_COVERAGE) -> Baseline:
    """Temperature (validation NLL), the answer cut reaching ``coverage`` on validation,
    and ``calibrate``'s rank thresholds on the photos it rejects."""
    from biolit_id.cli.evaluation.rank_fit import fit_taxon_thresholds

    y = _labels(val, b.species)
    known = y >= 0
    b.temperature = fit_logit_scale(b.logits(val.embeddings[known]), y[known], 1.0)
    conf = np.sort(b.distribution(val.embeddings[known]).max(axis=1))[::-1]
    k = min(len(conf), max(1, int(np.ceil(coverage * len(conf) - 1e-9))))
    b.cut = float(conf[k - 1])
    names = [s for s, ok in zip(val.species, known, strict=True) if ok]
    b.taxon_thresholds, _ = fit_taxon_thresholds(b.scored(val.embeddings[known], names),
                                                 names, catalog)
    b.fit_info.update(temperature=b.temperature, cut=b.cut,
                      validation_nll=_nll(b, val.embeddings, y),
                      taxon_thresholds=dict(b.taxon_thresholds))
    return b


def baselines(train: EmbeddingSet, val: EmbeddingSet, catalog: Catalog,
              coverage: float = DEFAULT_COVERAGE) -> dict[str, Baseline]:
    """Class-mean cosine, shrinkage LDA with the shrinkage of lowest validation NLL, and
    exemplar kNN."""
    cos = calibrated(cosine(train), val, catalog, coverage)
    fits = [calibrated(lda(train, lam), val, catalog, coverage) for lam in LDA_SHRINKAGE]
    best = min(fits, key=lambda b: b.fit_info["validation_nll"])
    best.fit_info["shrinkage_tried"] = {f.fit_info["shrinkage"]: f.fit_info["validation_nll"]
                                        for f in fits}
    best.name = "lda"
    return {"cosine": cos, "lda": best, "knn": calibrated(knn(train), val, catalog, coverage)}
