"""``biolit-id evaluate``: a bundle on held-out embeddings -> metrics.json and an HTML report.

Accuracies follow the seed's convention (docs/seed-v4.md, "Published
results") so numbers compare with the seed's; bundles are also compared at
equal coverage, and ``--compare-seed`` runs the seed's method on the same
photos. Metrics: docs/training.md ("evaluate").
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from biolit_id.cli.evaluation import observations
from biolit_id.cli.evaluation import real_crops as evaluate_real
from biolit_id.cli.evaluation.metrics import (
    ScoredSet,
    at_coverage,
    fallback_outcomes,
    load_labelled_split,
    reliability_bins,
    risk_coverage_curve,
    score_set,
)
from biolit_id.cli.training.calibration_metrics import ece, top1_calibration
from biolit_id.cli.training.datasets import DatasetError, EmbeddingSet, fingerprint
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import Bundle, BundleError, load_bundle
from biolit_id.server.decision.types import SEED_METHOD_NAMES, Method

log = logging.getLogger(__name__)

TOP_CONFUSIONS = 15
REPORT_COVERAGES = (0.74, 0.88)  # the seed's own coverage on this kind of data, and BioLit's


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def common_species(bundle: Bundle) -> list[str]:
    """The long tail's head for reports: what train recorded (the most frequent species),
    else the head's classes (a seed bundle's 50 common species)."""
    return list((bundle.extra.get("groups") or {}).get("common") or bundle.common)


def compute_metrics(bundle: Bundle, data: EmbeddingSet, scored: ScoredSet,
                    catalog: Catalog, common: Sequence[str] | None = None) -> dict:
    """Every number of the report; ``common`` overrides the common/rare split (so two
    bundles compared on one test set are grouped alike)."""
    truth, routed = scored.truth, scored.routed
    accepted, correct = scored.accepted, scored.correct
    common = set(common_species(bundle) if common is None else common)
    is_common = np.array([s in common for s in data.species], dtype=bool)
    known = truth >= 0
    is_rare = known & ~is_common
    n = len(truth)

    outcome = fallback_outcomes(scored, data.species, catalog, bundle)
    per_method = {}
    methods = ((Method.FUSED, Method.REJECTED) if bundle.routing == "fused" else
               (Method.CLASSIFIER, Method.CLASSIFIER_LOW, Method.PROTOTYPE, Method.REJECTED))
    for method in methods:
        mask = routed.method == int(method)
        per_method[SEED_METHOD_NAMES[method]] = {
            "count": int(mask.sum()),
            "correct": int((mask & correct).sum()),
            "accuracy": _ratio((mask & correct).sum(), mask.sum()),
        }
    # As the service reports it: a rejection answered at a higher rank is method TAXON.
    per_method[SEED_METHOD_NAMES[Method.REJECTED]]["count"] -= outcome["fallbacks"]
    per_method[SEED_METHOD_NAMES[Method.TAXON]] = {
        "count": outcome["fallbacks"], "correct": outcome["correct"],
        "accuracy": _ratio(outcome["correct"], outcome["fallbacks"]),
    }

    c2g = scored.common_to_global
    cidx = {g: i for i, g in enumerate(c2g.tolist())}
    head_labels = np.array([cidx.get(int(t), -1) for t in truth], dtype=np.int64)
    head_ece = top1_calibration(scored.p_common, head_labels)[0] if len(c2g) else None
    proto_ece = top1_calibration(scored.p_proto, truth)[0]
    head_top1 = (_ratio((scored.p_common.argmax(1) == head_labels)[head_labels >= 0].sum(),
                        (head_labels >= 0).sum()) if len(c2g) else None)

    train_counts = (bundle.extra.get("train_counts") or {})
    per_species = []
    for name in sorted(set(data.species)):
        mask = np.array([s == name for s in data.species])
        per_species.append({
            "species": name,
            "common": name in common,
            "known": name in bundle.species,
            "train_count": int(train_counts.get(name, 0)),
            "test_count": int(mask.sum()),
            "coverage": float(accepted[mask].mean()),
            "accuracy_all": float(correct[mask].mean()),
            "accuracy_accepted": _ratio(correct[mask].sum(), accepted[mask].sum()),
        })
    wrong = accepted & ~correct
    confusions = Counter(
        (data.species[i], scored.names[int(routed.species[i])]) for i in np.flatnonzero(wrong)
    )
    curve_risk = risk_coverage_curve(scored)[1]
    recorded = (bundle.extra.get("split") or {}).get("test_fingerprint")
    test_fp = fingerprint(data)
    return {
        "samples": n,
        "species_in_test": len(set(data.species)),
        "unknown_species_samples": int((~known).sum()),
        "coverage": float(accepted.mean()) if n else 0.0,
        "accuracy_global": _ratio(correct.sum(), accepted.sum()),
        "accuracy_common": _ratio((correct & is_common).sum(), (accepted & is_common).sum()),
        "accuracy_rare": _ratio((correct & is_rare).sum(), (accepted & is_rare).sum()),
        "accuracy_all": _ratio(correct.sum(), n),
        "accuracy_all_common": _ratio((correct & is_common).sum(), is_common.sum()),
        "accuracy_all_rare": _ratio((correct & is_rare).sum(), is_rare.sum()),
        "coverage_common": _ratio((accepted & is_common).sum(), is_common.sum()),
        "coverage_rare": _ratio((accepted & is_rare).sum(), is_rare.sum()),
        "ece": ece(routed.confidence[accepted], correct[accepted]),
        "routing": bundle.routing,
        # One cut on the decision's confidence answering exactly this share of the photos.
        "at_coverage": {f"{c:.2f}": at_coverage(scored, c, {"common": is_common,
                                                            "rare": is_rare})
                        for c in REPORT_COVERAGES},
        "rank_answer_precision": _ratio(outcome["correct"], outcome["fallbacks"]),
        "rank_answers": outcome["fallbacks"],
        # Area under the risk-coverage curve: one number to compare bundles across coverages.
        "aurc": float(curve_risk.mean()) if len(curve_risk) else None,
        "ece_head": head_ece,
        "ece_prototype": proto_ece,
        "head_top1_accuracy_common": head_top1,
        "prototype_top1_accuracy": _ratio((scored.p_proto.argmax(1) == truth)[known].sum(),
                                          known.sum()),
        "per_method": per_method,
        "rejected": int((~accepted).sum()),
        "taxon_fallback_count": outcome["fallbacks"],
        "taxon_fallback_rate": _ratio(outcome["fallbacks"], n),
        "taxon_fallback_share_of_rejected": _ratio(outcome["fallbacks"], outcome["rejected"]),
        "taxon_fallback_accuracy": _ratio(outcome["correct"], outcome["fallbacks"]),
        "taxon_fallback_per_rank": outcome["per_rank"],
        "answered_any_rank": _ratio(accepted.sum() + outcome["fallbacks"], n),
        "reliability": reliability_bins(routed.confidence[accepted], correct[accepted]),
        "top_confusions": [
            {"true": t, "predicted": p, "count": c}
            for (t, p), c in confusions.most_common(TOP_CONFUSIONS)
        ],
        "per_species": per_species,
        "thresholds": {**bundle.thresholds.__dict__, "taxon": bundle.taxon_thresholds},
        "groups": {"common": sorted(common)},
        "bundle_id": bundle.bundle_id,
        "test_fingerprint": test_fp,
        "test_is_bundle_split": (recorded == test_fp) if recorded else None,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    observations.add_arguments(parser)  # --observations, --prior
    evaluate_real.add_arguments(parser)  # --real-crops
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--embeddings", type=Path, default=None,
                        help="test parquet (default: BUNDLE/split/test.parquet)")
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--catalog", type=Path, default=None)
    parser.add_argument("--record", action="store_true",
                        help="also store the headline metrics in the bundle's manifest")
    parser.add_argument("--compare-seed", type=Path, default=None, metavar="BUNDLE",
                        help="a bundle with the seed's method (import-seed, or train "
                             "--routing seed) to evaluate on the same photos, side by side")


HEADLINE = ("coverage", "accuracy_global", "accuracy_common", "accuracy_rare", "accuracy_all",
            "ece", "aurc", "taxon_fallback_rate", "rank_answer_precision")


def run(args: argparse.Namespace) -> int:
    from biolit_id.cli.evaluation.report import write_report

    if args.observations is not None:  # observations, not photos: tools/evaluate_observations
        return observations.run(args)
    if args.real_crops is not None:  # the seed v2's real crops: tools/evaluate_real
        return evaluate_real.run(args)

    try:
        bundle, data, path = load_labelled_split(args.bundle, args.embeddings, "test")
    except (BundleError, DatasetError) as exc:
        log.error("%s", exc)
        return 2
    if bundle.training_fingerprint and fingerprint(data) == bundle.training_fingerprint:
        log.error("%s is the bundle's training data: evaluating on it measures nothing", path)
        return 2
    catalog = Catalog.load(args.catalog) if args.catalog else Catalog.load_default()
    scored = score_set(bundle, data.embeddings, data.species)
    metrics = compute_metrics(bundle, data, scored, catalog)
    coverage, risk = risk_coverage_curve(scored)
    curves = {"coverage": coverage, "risk": risk}
    if args.compare_seed is not None:
        try:
            seed = load_bundle(args.compare_seed, bundle.model_fingerprint, bundle.embedding_dim)
        except BundleError as exc:
            log.error("--compare-seed: %s", exc)
            return 2
        seed_scored = score_set(seed, data.embeddings, data.species)
        metrics["compare_seed"] = compare(seed, data, seed_scored, catalog, metrics)
        seed_cov, seed_risk = risk_coverage_curve(seed_scored)
        curves["seed"] = {"coverage": seed_cov, "risk": seed_risk,
                          "label": f"seed's method ({args.compare_seed.name})"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), "utf-8")
    write_report(out, metrics, curves, bundle)
    if args.record:
        bundle.metrics = {**bundle.metrics, "test": {k: metrics[k] for k in HEADLINE}}
        bundle.save(Path(args.bundle))
    print(f"evaluated {metrics['samples']} photos -> {out / 'metrics.json'}, "
          f"{out / 'report.html'}")
    for key in HEADLINE:
        value = metrics[key]
        print(f"  {key:24s} {'n/a' if value is None else f'{value:.4f}'}")
    for cov, at in metrics["at_coverage"].items():
        print(f"  at coverage {cov}: accuracy {_fmt(at['accuracy'])}, common "
              f"{_fmt(at['accuracy_common'])}, rare {_fmt(at['accuracy_rare'])}")
    counts = ", ".join(f"{k} {v['count']}" for k, v in metrics["per_method"].items())
    print(f"  methods: {counts}")
    if "compare_seed" in metrics:
        c = metrics["compare_seed"]
        print(f"  seed's method: coverage {_fmt(c['coverage'])}, accuracy "
              f"{_fmt(c['accuracy_global'])} (common {_fmt(c['accuracy_common'])}, rare "
              f"{_fmt(c['accuracy_rare'])}), ECE {_fmt(c['ece'])}")
    return 0


def compare(seed: Bundle, data: EmbeddingSet, scored: ScoredSet, catalog: Catalog,
            ours: dict) -> dict:
    """The seed's method on the same photos, grouped as ours: the headline numbers."""
    full = compute_metrics(seed, data, scored, catalog, common=ours["groups"]["common"])
    keep = (*HEADLINE, "accuracy_all_rare", "accuracy_all_common", "coverage_rare",
            "at_coverage", "per_method", "routing", "rank_answers", "bundle_id")
    return {k: full[k] for k in keep}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"

