"""The fused decision's pieces: its formula, its cut, the routing registry and the tree.

Model-free and fast: the long-tail and runtime-species behaviour is in
``test_fused_longtail.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biolit_id.cli.calibrate import answer_threshold
from biolit_id.cli.evaluation.metrics import ScoredSet
from biolit_id.cli.training.fusion import fit_fusion, fusion_logits_torch
from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import DEFAULT_HEAD, Bundle, BundleError
from biolit_id.server.decision.fused import (
    FusedScorer,
    FusionWeights,
    fused_logits,
    log_softmax,
    neighbour_similarity,
)
from biolit_id.server.decision.head import build_head, head_state_from_module
from biolit_id.server.decision.ranks import answer_rank, taxon_masses, taxon_of
from biolit_id.server.decision.registry import ROUTINGS, scorer_for
from biolit_id.server.decision.rules import route_fused
from biolit_id.server.decision.seed_cascade import SeedCascadeScorer
from biolit_id.server.decision.types import Method, Scores, Thresholds
from biolit_id.server.decision.zero_shot import ZeroShotScorer

CATALOG = Catalog.load_default()
WEIGHTS = FusionWeights(proto=20.0, head=0.7, prior=0.3, novel_proto=15.0, novel_knn=30.0,
                        novel_offset=-4.0)


def tiny_bundle(species: list[str], head: list[str], routing: str = "fused",
                weights: FusionWeights = WEIGHTS, dim: int = 8, seed: int = 0) -> Bundle:
    """A real bundle over ``species`` with a seeded random head over ``head``."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(len(species), dim)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    torch.manual_seed(seed)
    state = head_state_from_module(build_head(dim, len(head), DEFAULT_HEAD)) if head else {}
    return Bundle(
        model_id="test", model_fingerprint="", embedding_dim=dim, species=list(species),
        common=list(head), head_config=dict(DEFAULT_HEAD), head_state=state,
        visual_prototypes=protos, text_prototypes=protos, prototypes=protos,
        whitening_mu=None, whitening_W=None, temperature=10.0, alpha=1.0,
        thresholds=Thresholds(answer=0.6), routing=routing,
        fusion={"weights": weights.to_json(),
                "head_log_prior": np.log(np.full(len(head), 1 / max(len(head), 1))).tolist()},
    )


def test_numpy_and_torch_formulas_agree():
    rng = np.random.default_rng(0)
    cos = rng.uniform(-1, 1, size=(7, 6))
    logits = rng.normal(size=(7, 4))
    c2g = np.array([4, 0, 2, 5])
    prior = np.log(rng.dirichlet(np.ones(4)))
    knn = np.full(cos.shape, np.nan)
    knn[:, 1] = rng.uniform(0, 1, 7)
    ours = fused_logits(cos, log_softmax(logits), c2g, prior, knn, WEIGHTS)
    w = {k: torch.tensor(v, dtype=torch.float64) for k, v in WEIGHTS.to_json().items()}
    near = np.where(np.isnan(knn), cos, knn)
    theirs = fusion_logits_torch(w, *(torch.as_tensor(a) for a in (cos, log_softmax(logits))),
                                 c2g, torch.as_tensor(prior), torch.as_tensor(near)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    # Species 1 and 3 are outside the head: their prototype (and kNN) terms, at the prior
    # level of an average head species.
    level = WEIGHTS.novel_offset + WEIGHTS.prior * prior.mean()
    assert ours[0, 3] == pytest.approx(WEIGHTS.novel_proto * cos[0, 3]
                                       + WEIGHTS.novel_knn * cos[0, 3] + level)
    assert ours[0, 1] == pytest.approx(WEIGHTS.novel_proto * cos[0, 1]
                                       + WEIGHTS.novel_knn * knn[0, 1] + level)


def test_fit_recovers_the_weights_that_made_the_labels():
    rng = np.random.default_rng(1)
    n, s = 4000, 6
    cos = rng.uniform(-1, 1, size=(n, s))
    logits = rng.normal(size=(n, 4)) * 2
    c2g = np.array([0, 1, 2, 3])
    prior = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    true = FusionWeights(proto=6.0, head=0.8, prior=0.5, novel_proto=5.0, novel_knn=0.0,
                         novel_offset=-1.0)
    p = np.exp(log_softmax(fused_logits(cos, log_softmax(logits), c2g, prior, None, true)))
    labels = np.array([rng.choice(s, p=row) for row in p])
    start = FusionWeights.default(1.0, 4)
    fitted = fit_fusion(cos, logits, c2g, prior, None, labels, start,
                        ("proto", "head", "prior", "novel_proto", "novel_offset"))
    assert fitted.proto == pytest.approx(6.0, rel=0.1)
    assert fitted.head == pytest.approx(0.8, rel=0.15)
    assert fitted.novel_offset == pytest.approx(-1.0, abs=0.3)
    assert fitted.novel_knn == start.novel_knn  # not free: kept


def test_route_fused_answers_above_the_cut_and_reports_the_probability():
    dist = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.0, 0.0, 0.0]])
    routed = route_fused(dist, Thresholds(answer=0.5))
    assert routed.species.tolist() == [0, -1, -1]
    assert routed.method.tolist() == [Method.FUSED, Method.REJECTED, Method.REJECTED]
    np.testing.assert_allclose(routed.confidence, [0.7, 0.4, 0.0])


def test_registry_picks_the_bundles_routing():
    species = ["Patella vulgata", "Carcinus maenas", "Fucus serratus"]
    assert isinstance(scorer_for(tiny_bundle(species, species[:2])), FusedScorer)
    assert isinstance(scorer_for(tiny_bundle(species, species[:2], "seed")), SeedCascadeScorer)
    assert isinstance(scorer_for(None), ZeroShotScorer)
    assert {"seed", "fused"} <= set(ROUTINGS)
    with pytest.raises(BundleError, match="routing 'per-rank'"):
        scorer_for(tiny_bundle(species, species[:2], "per-rank"))


def test_species_outside_the_head_and_restrictions_share_one_distribution():
    species = ["Patella vulgata", "Carcinus maenas", "Fucus serratus", "Asterias rubens"]
    bundle = tiny_bundle(species, species[:2])
    scorer = FusedScorer(bundle)
    protos = PrototypeSet(tuple(species), bundle.prototypes)
    query = bundle.prototypes[3:4]  # exactly on a species the head does not know
    scores = scorer.score(query, protos)
    assert scores.distribution.sum() == pytest.approx(1.0)
    assert scores.distribution[0].argmax() == 3  # a prototype-only species can win
    allowed = np.array([True, False, True, False])
    restricted = scorer.score(query, protos, allowed)
    assert restricted.distribution[0, ~allowed].max() == 0.0
    assert restricted.distribution[0].sum() == pytest.approx(1.0)
    # Renormalised: the allowed species keep their odds.
    full = scores.distribution[0]
    assert restricted.distribution[0, 0] / restricted.distribution[0, 2] == pytest.approx(
        full[0] / full[2])


def test_neighbours_average_the_nearest_photos():
    q = np.array([[1.0, 0.0]])
    photos = [np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]]), np.zeros((0, 2))]
    sims = neighbour_similarity(q, photos, k=3)
    assert sims[0, 0] == pytest.approx((1.0 + 0.8 + 0.6) / 3)
    assert np.isnan(sims[0, 1])


def _scored_fused(conf_right: list[tuple[float, bool]]) -> ScoredSet:
    """Two-species distributions whose top probability and correctness are given."""
    species = ["Patella vulgata", "Carcinus maenas"]
    bundle = tiny_bundle(species, species)
    scorer = FusedScorer(bundle)
    p = np.array([[c, 1 - c] for c, _ in conf_right])
    truth = np.array([0 if ok else 1 for _, ok in conf_right])
    scores = Scores(np.zeros((len(p), 0)), p, np.zeros(0, np.int64),
                    route_fused(p, bundle.thresholds), p)
    return ScoredSet(scores, np.zeros((len(p), 0)), truth, tuple(species), scorer)


def test_answer_threshold_meets_coverage_or_risk():
    rows = [(0.99, True)] * 50 + [(0.9, True)] * 30 + [(0.8, False)] * 10 + [(0.6, True)] * 10
    scored = _scored_fused(rows)
    th, info = answer_threshold(scored, target_coverage=0.8)
    assert th.answer == pytest.approx(0.9) and info["coverage"] == pytest.approx(0.8)
    assert info["risk"] == 0.0
    th, info = answer_threshold(scored, max_risk=0.1)
    assert th.answer == pytest.approx(0.6)  # 10 wrong of 100 answers: just allowed
    assert info["coverage"] == 1.0 and info["risk"] == pytest.approx(0.1)
    th, info = answer_threshold(scored, max_risk=0.05)
    assert th.answer == pytest.approx(0.9) and info["target_met"]


def test_group_names_sit_at_their_place_in_the_tree():
    patella, mixed = CATALOG.get("Patella sp."), CATALOG.get("Magallana gigas / Ostrea edulis")
    assert taxon_of(patella, "genus") == "Patella"
    assert answer_rank(patella) == "species_group"  # a class, not a genus answer
    assert answer_rank(CATALOG.get("Littorina fabalis/obtusata")) == "species_group"
    assert answer_rank(CATALOG.get("Carcinus maenas")) == "species"
    assert taxon_of(mixed, "genus") == "" and taxon_of(mixed, "family") == "Ostreidae"
    names = ["Patella sp.", "Patella vulgata", "Magallana gigas / Ostrea edulis"]
    genus = taxon_masses(np.array([0.3, 0.5, 0.2]), names, CATALOG, "genus")
    assert genus == pytest.approx({"Patella": 0.8})  # no "Magallana / Ostrea" genus
    family = taxon_masses(np.array([0.3, 0.5, 0.2]), names, CATALOG, "family")
    assert family == pytest.approx({"Patellidae": 0.8, "Ostreidae": 0.2})
