"""Scoring a labelled embedding set with a bundle, and the numbers we judge it by.

``score_set`` runs the bundle's own scorer (``server.decision.registry.scorer_for``:
the seed's cascade or the fused distribution) and ``rank_answers`` the
service's own taxonomy code, so calibration and evaluation measure exactly
what ``serve`` will answer — there is no second implementation of the
decision rule to drift out of sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from biolit_id.cli.training.calibration_metrics import ECE_BINS
from biolit_id.cli.training.datasets import EmbeddingSet, read_embeddings
from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import Bundle, load_bundle
from biolit_id.server.decision.fused import FusedScorer
from biolit_id.server.decision.ranks import rank_confidences, taxon_contains, taxon_fallback
from biolit_id.server.decision.registry import scorer_for
from biolit_id.server.decision.types import (
    NeighbourFn,
    RankAnswer,
    Routed,
    Scorer,
    Scores,
    Thresholds,
)


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
    """One labelled set through the bundle's scorer: probabilities, decisions, truth.

    ``components`` keeps what a fused scorer combines (cosines, head logits,
    head rows, kNN) so calibration can refit its weights without rescoring.
    """

    scores: Scores
    head_logits: np.ndarray  # [N, C] (unscaled by any softmax)
    truth: np.ndarray  # [N] global species index, -1 when the bundle does not know it
    names: tuple[str, ...]
    scorer: Scorer
    components: tuple | None = None

    def __len__(self) -> int:
        return len(self.truth)

    @property
    def p_common(self) -> np.ndarray:
        return self.scores.p_common

    @property
    def p_proto(self) -> np.ndarray:
        return self.scores.p_proto

    @property
    def common_to_global(self) -> np.ndarray:
        return self.scores.common_to_global

    @property
    def routed(self) -> Routed:
        return self.scores.routed

    @property
    def distribution(self) -> np.ndarray:
        return self.scores.distribution

    @property
    def accepted(self) -> np.ndarray:
        return self.routed.species >= 0

    @property
    def correct(self) -> np.ndarray:
        return self.accepted & (self.routed.species == self.truth)

    def reroute(self, thresholds: Thresholds) -> Routed:
        return self.scorer.decide(self.scores, thresholds).routed

    def with_thresholds(self, thresholds: Thresholds) -> ScoredSet:
        return replace(self, scores=self.scorer.decide(self.scores, thresholds))

    def row_scores(self, i: int) -> Scores:
        return row_scores(self.scores, i)


def row_scores(scores: Scores | ScoredSet, i: int) -> Scores:
    """Row ``i`` as a one-row ``Scores``: ``rank_confidences`` takes a batch."""
    scores = scores.scores if isinstance(scores, ScoredSet) else scores
    r = scores.routed
    return Scores(
        p_common=scores.p_common[i : i + 1],
        p_proto=scores.p_proto[i : i + 1],
        common_to_global=scores.common_to_global,
        routed=Routed(r.method[i : i + 1], r.species[i : i + 1], r.confidence[i : i + 1]),
        distribution=scores.distribution[i : i + 1],
        species_group=scores.species_group,
    )


def concat_scores(parts: Sequence[Scores]) -> Scores:
    return Scores(
        p_common=np.concatenate([p.p_common for p in parts]),
        p_proto=np.concatenate([p.p_proto for p in parts]),
        common_to_global=parts[0].common_to_global,
        routed=Routed(*(np.concatenate([getattr(p.routed, f) for p in parts])
                        for f in ("method", "species", "confidence"))),
        distribution=np.concatenate([p.distribution for p in parts]),
        species_group=parts[0].species_group,
    )


def bundle_prototypes(bundle: Bundle) -> PrototypeSet:
    return PrototypeSet(tuple(bundle.species), bundle.prototypes.astype(np.float32))


def score_set(bundle: Bundle, embeddings: np.ndarray, species: Sequence[str],
              batch_size: int = 4096, scorer: Scorer | None = None,
              protos: PrototypeSet | None = None,
              neighbours: NeighbourFn | None = None) -> ScoredSet:
    """Score a labelled set as ``serve`` would (default: the bundle's own prototypes)."""
    scorer = scorer or scorer_for(bundle)
    protos = protos or bundle_prototypes(bundle)
    index = protos.index()
    truth = np.array([index.get(s, -1) for s in species], dtype=np.int64)
    embeddings = np.asarray(embeddings, dtype=np.float32).reshape(len(truth), bundle.embedding_dim)
    starts = range(0, max(len(embeddings), 1), batch_size)  # an empty set: one empty chunk
    if isinstance(scorer, FusedScorer):
        parts = [scorer.components(embeddings[s : s + batch_size], protos, neighbours)
                 for s in starts]
        cos, logits = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
        knn = None if parts[0][3] is None else np.concatenate([p[3] for p in parts])
        components = (cos, logits, parts[0][2], knn)
        scores = scorer.from_components(*components,
                                        species_group=scorer.species_groups(protos.names))
    else:
        scores = concat_scores([scorer.score(embeddings[s : s + batch_size], protos,
                                             neighbours=neighbours) for s in starts])
        head = getattr(scorer, "head", None)
        logits = (head.logits(embeddings) if head is not None
                  else np.zeros((len(embeddings), 0)))
        components = None
    return ScoredSet(scores, logits, truth, protos.names, scorer, components)


# ------------------------------------------------------------ calibration


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

    Rejected photos are given their best guess under the decision's
    distribution, so the curve shows what lowering the bar would buy.
    """
    guess = best_guess(scored)
    order = np.argsort(-scored.routed.confidence, kind="stable")
    wrong = (guess[order] != scored.truth[order]).astype(np.float64)
    k = np.arange(1, len(order) + 1)
    return k / max(len(order), 1), np.cumsum(wrong) / k


def best_guess(scored: ScoredSet) -> np.ndarray:
    """The species each photo would get if the bar were lowered to its confidence."""
    if not len(scored):
        return np.zeros(0, dtype=np.int64)
    return np.where(scored.accepted, scored.routed.species, scored.distribution.argmax(axis=1))


def at_coverage(scored: ScoredSet, coverage: float, groups: dict[str, np.ndarray]) -> dict:
    """Accuracy over the ``coverage`` most confident photos (one cut on the confidence).

    ``groups`` (name -> row mask, e.g. common/rare) get their own accuracy
    over the answered photos of that group.
    """
    n = len(scored)
    if not n:
        return {"coverage": 0.0, "threshold": None, "accuracy": None}
    k = max(1, int(np.ceil(coverage * n - 1e-9)))
    order = np.argsort(-scored.routed.confidence, kind="stable")
    answered = np.zeros(n, dtype=bool)
    answered[order[:k]] = True
    right = best_guess(scored) == scored.truth
    out = {"coverage": k / n, "threshold": float(scored.routed.confidence[order[k - 1]]),
           "accuracy": float(right[answered].mean())}
    for name, mask in groups.items():
        sel = answered & mask
        out[f"accuracy_{name}"] = float(right[sel].mean()) if sel.any() else None
        out[f"coverage_{name}"] = float(sel.sum() / mask.sum()) if mask.any() else None
    return out


# ------------------------------------------------------------ rank-level answers


def rank_answers(scored: ScoredSet, rows: Sequence[int], catalog: Catalog
                 ) -> list[list[RankAnswer]]:
    """The service's per-rank best taxon (with mass) for each of ``rows``."""
    return [rank_confidences(scored.row_scores(int(i)).distribution[0], scored.names,
                             catalog) for i in rows]


def taxon_is_right(answer: RankAnswer, true_species: str, catalog: Catalog) -> bool:
    return taxon_contains(answer.rank, answer.taxon, true_species, catalog)


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
