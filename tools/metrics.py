"""Scoring a labelled embedding set with a bundle, and the numbers we judge it by.

``score_set`` runs the service's own ``HybridScorer`` and routing, and
``rank_answers`` the service's own taxonomy code, so calibration and
evaluation measure exactly what ``serve`` will answer — there is no second
implementation of the decision rule to drift out of sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biolit_id.cli.datasets import EmbeddingSet, read_embeddings
from biolit_id.core.types import PrototypeSet
from biolit_id.server.bundle import Bundle, load_bundle
from biolit_id.server.catalog import Catalog
from biolit_id.server.routing import Routed, Thresholds, route_hybrid
from biolit_id.server.scoring import HybridScorer, Scores
from biolit_id.server.taxonomy import RankAnswer, rank_confidences, taxon_fallback

ECE_BINS = 15


def load_labelled_split(bundle_dir: Path, embeddings: Path | None,
                        split: str) -> tuple[Bundle, EmbeddingSet, Path]:
    """The bundle and a labelled set made with its model, and the set's path.

    ``embeddings`` defaults to the bundle's own split, ``BUNDLE/split/SPLIT.parquet``.
    Raises BundleError or DatasetError (unreadable, or embeddings of another model).
    """
    path = embeddings or Path(bundle_dir) / "split" / f"{split}.parquet"
    bundle = load_bundle(bundle_dir)
    data = read_embeddings(path)
    data.check_model(bundle.model_fingerprint, bundle.embedding_dim, str(path))
    return bundle, data, path


@dataclass
class ScoredSet:
    """One labelled set through the bundle: probabilities, decisions, truth."""

    p_common: np.ndarray  # [N, C]
    p_proto: np.ndarray  # [N, S]
    head_logits: np.ndarray  # [N, C] (unscaled by any softmax)
    common_to_global: np.ndarray  # [C]
    routed: Routed
    truth: np.ndarray  # [N] global species index, -1 when the bundle does not know it
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.truth)

    @property
    def accepted(self) -> np.ndarray:
        return self.routed.species >= 0

    @property
    def correct(self) -> np.ndarray:
        return self.accepted & (self.routed.species == self.truth)

    def reroute(self, thresholds: Thresholds) -> Routed:
        return route_hybrid(self.p_common, self.p_proto, self.common_to_global, thresholds)

    def with_routed(self, routed: Routed) -> ScoredSet:
        return ScoredSet(self.p_common, self.p_proto, self.head_logits, self.common_to_global,
                         routed, self.truth, self.names)

    def row_scores(self, i: int) -> Scores:
        return row_scores(self, i)


def row_scores(scores: Scores | ScoredSet, i: int) -> Scores:
    """Row ``i`` as a one-row ``Scores``: ``rank_confidences`` takes a batch."""
    r = scores.routed
    return Scores(
        p_common=scores.p_common[i : i + 1],
        p_proto=scores.p_proto[i : i + 1],
        common_to_global=scores.common_to_global,
        routed=Routed(r.method[i : i + 1], r.species[i : i + 1], r.confidence[i : i + 1]),
    )


def score_set(bundle: Bundle, embeddings: np.ndarray, species: Sequence[str],
              batch_size: int = 4096) -> ScoredSet:
    scorer = HybridScorer(bundle)
    protos = PrototypeSet(tuple(bundle.species), bundle.prototypes.astype(np.float32))
    index = protos.index()
    truth = np.array([index.get(s, -1) for s in species], dtype=np.int64)
    parts: list[Scores] = []
    logits: list[np.ndarray] = []
    for start in range(0, len(embeddings), batch_size):
        chunk = np.asarray(embeddings[start : start + batch_size], dtype=np.float32)
        parts.append(scorer.score(chunk, protos))
        logits.append(scorer.head.logits(chunk) if scorer.head is not None
                      else np.zeros((len(chunk), 0)))
    if not parts:
        empty = np.zeros(0)
        routed = Routed(empty.astype(int), empty.astype(int), empty)
        return ScoredSet(np.zeros((0, len(bundle.common))), np.zeros((0, len(bundle.species))),
                         np.zeros((0, len(bundle.common))), bundle.common_to_global(), routed,
                         truth, protos.names)
    routed = Routed(
        np.concatenate([p.routed.method for p in parts]),
        np.concatenate([p.routed.species for p in parts]),
        np.concatenate([p.routed.confidence for p in parts]),
    )
    return ScoredSet(
        p_common=np.concatenate([p.p_common for p in parts]),
        p_proto=np.concatenate([p.p_proto for p in parts]),
        head_logits=np.concatenate(logits),
        common_to_global=parts[0].common_to_global,
        routed=routed,
        truth=truth,
        names=protos.names,
    )


# ------------------------------------------------------------ calibration


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error, equal-width bins (Guo et al. 2017)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(confidence[mask].mean() - correct[mask].mean())
    return float(total)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray,
                     bins: int = ECE_BINS) -> list[dict]:
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        out.append({
            "low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
            "confidence": float(confidence[mask].mean()) if mask.any() else None,
            "accuracy": float(correct[mask].mean()) if mask.any() else None,
        })
    return out


def top1_calibration(probs: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(ECE, NLL) of a full distribution's top-1 against labels (rows with truth >= 0)."""
    keep = truth >= 0
    if not keep.any() or probs.shape[1] == 0:
        return 0.0, 0.0
    p = probs[keep]
    t = truth[keep]
    top = p.argmax(axis=1)
    nll = float(-np.log(np.maximum(p[np.arange(len(t)), t], 1e-12)).mean())
    return ece(p.max(axis=1), top == t), nll


def fit_logit_scale(logits: np.ndarray, labels: np.ndarray, init: float = 1.0,
                    max_iter: int = 200) -> float:
    """Scale ``s`` minimising NLL of softmax(s * logits) — temperature scaling.

    Parametrised as ``s = exp(u)`` so it stays positive; LBFGS converges in a
    few dozen steps on this 1-d convex problem (Guo et al. 2017; arXiv:2108.00340
    learns the prototype temperature the same way).
    """
    import torch

    keep = np.asarray(labels) >= 0
    if not keep.any():
        return float(init)
    z = torch.as_tensor(np.asarray(logits)[keep], dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels)[keep], dtype=torch.long)
    u = torch.tensor([np.log(max(init, 1e-6))], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([u], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(u.exp() * z, y)
        loss.backward()
        return loss

    opt.step(closure)
    scale = float(u.detach().exp())
    return float(np.clip(scale, 1e-3, 1e4))


# ------------------------------------------------------------ selective accuracy


def risk_coverage(routed: Routed, truth: np.ndarray) -> tuple[float, float]:
    """(coverage, risk = error rate among accepted answers)."""
    accepted = routed.species >= 0
    coverage = float(accepted.mean()) if len(accepted) else 0.0
    if not accepted.any():
        return coverage, 0.0
    return coverage, float((routed.species[accepted] != truth[accepted]).mean())


def risk_coverage_curve(scored: ScoredSet) -> tuple[np.ndarray, np.ndarray]:
    """Coverage/risk as a single cut on the decision confidence sweeps from 1 to 0.

    Rejected photos are given their best guess under the routing-consistent
    distribution, so the curve shows what lowering the bar would buy.
    """
    from biolit_id.server.routing import routed_distribution

    dist = routed_distribution(scored.routed.method, scored.p_common, scored.p_proto,
                               scored.common_to_global)
    guess = np.where(scored.accepted, scored.routed.species, dist.argmax(axis=1))
    order = np.argsort(-scored.routed.confidence, kind="stable")
    wrong = (guess[order] != scored.truth[order]).astype(np.float64)
    k = np.arange(1, len(order) + 1)
    return k / max(len(order), 1), np.cumsum(wrong) / k


# ------------------------------------------------------------ rank-level answers


def rank_answers(scored: ScoredSet, rows: Sequence[int], catalog: Catalog
                 ) -> list[list[RankAnswer]]:
    """The service's per-rank best taxon (with mass) for each of ``rows``."""
    return [rank_confidences(scored.row_scores(int(i)), scored.names, catalog) for i in rows]


def taxon_is_right(answer: RankAnswer, true_species: str, catalog: Catalog) -> bool:
    record = catalog.get(true_species)
    return bool(record and record.taxon_at(answer.rank) == answer.taxon)


def fallback_outcomes(scored: ScoredSet, species: Sequence[str], catalog: Catalog,
                      bundle: Bundle) -> dict:
    """For every rejected photo: the rank answer ``serve`` would give, and if it is right."""
    rejected = np.flatnonzero(~scored.accepted)
    answers = rank_answers(scored, rejected, catalog)
    per_rank: dict[str, dict[str, int]] = {}
    made = right = 0
    for row, ranks in zip(rejected, answers, strict=True):
        chosen = taxon_fallback(ranks, bundle)
        if chosen is None:
            continue
        ok = taxon_is_right(chosen, species[int(row)], catalog)
        made += 1
        right += ok
        stats = per_rank.setdefault(chosen.rank, {"count": 0, "correct": 0})
        stats["count"] += 1
        stats["correct"] += int(ok)
    return {"rejected": len(rejected), "fallbacks": made, "correct": right,
            "per_rank": per_rank}
