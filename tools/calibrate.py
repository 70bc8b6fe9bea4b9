"""``biolit-id calibrate``: cuts, rank thresholds (and the seed's temperatures) on held-out data.

Thresholds are chosen by the coverage or risk the operator asks for, not
guessed, and through the service's own scorer, so what is calibrated is what
serves. The three steps: docs/training.md ("calibrate").
"""

from __future__ import annotations

import argparse
import itertools
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from biolit_id.cli.evaluation.metrics import (
    ScoredSet,
    fallback_outcomes,
    fit_logit_scale,
    load_labelled_split,
    risk_coverage,
    score_set,
)
from biolit_id.cli.evaluation.rank_fit import DEFAULT_TAXON_PRECISION, fit_taxon_thresholds
from biolit_id.cli.training.calibration_metrics import ece, top1_calibration
from biolit_id.cli.training.crossfit import family_lines
from biolit_id.cli.training.datasets import DatasetError
from biolit_id.cli.training.fusion import HEAD_TERMS, fit_fusion
from biolit_id.cli.training.risk_control import (
    FLATTEN,
    RISK_GRID,
    clopper_pearson_upper,
    cuts_at_coverage,
    flatter_prior_weights,
    within_outside_target,
    without_own_species,
)
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import Bundle, BundleError
from biolit_id.server.decision.fused import FusedScorer
from biolit_id.server.decision.rules import masked_softmax, route_fused
from biolit_id.server.decision.types import SpeciesGroup, Thresholds, photo_groups

log = logging.getLogger(__name__)

DEFAULT_COVERAGE = 0.88
GRID = 21
FINE = 201


# ------------------------------------------------------------ temperatures


def last_linear_key(state: dict[str, np.ndarray]) -> str:
    """Prefix of the head's output layer (highest-numbered 2-d weight)."""
    keys = [k[: -len(".weight")] for k, v in state.items()
            if k.endswith(".weight") and np.asarray(v).ndim == 2]
    return max(keys, key=lambda k: int(k.split(".")[-1]) if k.split(".")[-1].isdigit() else -1)


def scale_head(bundle: Bundle, scale: float) -> Bundle:
    """softmax(s * logits) == softmax of a head whose last layer is multiplied by s."""
    key = last_linear_key(bundle.head_state)
    state = dict(bundle.head_state)
    state[f"{key}.weight"] = (state[f"{key}.weight"] * scale).astype(np.float32)
    if f"{key}.bias" in state:
        state[f"{key}.bias"] = (state[f"{key}.bias"] * scale).astype(np.float32)
    return replace(bundle, head_state=state)


def fit_temperatures(bundle: Bundle, embeddings: np.ndarray, scored: ScoredSet
                     ) -> tuple[Bundle, dict]:
    truth = scored.truth
    report: dict = {}
    out = bundle
    if bundle.common and len(scored.head_logits):
        cidx = {g: i for i, g in enumerate(scored.common_to_global.tolist())}
        labels = np.array([cidx.get(int(t), -1) for t in truth], dtype=np.int64)
        scale = fit_logit_scale(scored.head_logits, labels, 1.0)
        before = top1_calibration(scored.p_common, labels)
        out = scale_head(out, scale)
        after = top1_calibration(masked_softmax(scale * scored.head_logits, None), labels)
        report["head"] = {"temperature": 1.0 / scale, "ece_before": before[0],
                          "ece_after": after[0], "nll_before": before[1], "nll_after": after[1]}
    sims = bundle.whiten(embeddings).astype(np.float64) @ bundle.prototypes.T.astype(np.float64)
    temperature = fit_logit_scale(sims, truth, bundle.temperature)
    before = top1_calibration(scored.p_proto, truth)
    after = top1_calibration(masked_softmax(temperature * sims, None), truth)
    out = replace(out, temperature=temperature)
    report["prototype"] = {"temperature_before": bundle.temperature,
                           "temperature": temperature, "ece_before": before[0],
                           "ece_after": after[0], "nll_before": before[1], "nll_after": after[1]}
    return out, report


# ------------------------------------------------------------ routing thresholds


def _objective(coverage: float, risk: float, target_coverage: float | None,
               max_risk: float | None) -> tuple:
    """Sort key, lower is better; feasible settings always beat infeasible ones."""
    if max_risk is not None:
        if risk <= max_risk + 1e-12 and coverage > 0:
            return (0, -coverage, risk)
        return (1, risk, -coverage)
    if coverage >= target_coverage - 1e-12:
        return (0, risk, -coverage)  # equal risk: answering more is strictly better
    return (1, target_coverage - coverage, risk)


def search_thresholds(scored: ScoredSet, target_coverage: float | None = None,
                      max_risk: float | None = None, base: Thresholds | None = None
                      ) -> tuple[Thresholds, dict]:
    """Grid search, then coordinate refinement, over the three routing thresholds.

    Candidates are quantiles of the validation maxima, so the search spends
    its points where the photos are. Every candidate is routed by
    ``server.decision.rules.route_hybrid`` itself.
    """
    if (target_coverage is None) == (max_risk is None):
        raise ValueError("give exactly one of target_coverage and max_risk")
    truth = scored.truth
    c_max = scored.p_common.max(axis=1) if scored.p_common.shape[1] else np.zeros(len(truth))
    p_max = scored.p_proto.max(axis=1)

    def candidates(values: np.ndarray, n: int) -> np.ndarray:
        q = np.quantile(values, np.linspace(0, 1, n)) if len(values) else np.zeros(0)
        return np.unique(np.clip(np.concatenate([q, [0.0, 0.4, 0.8, 1.0]]), 0.0, 1.0))

    seen: dict[tuple[float, float, float], tuple] = {}
    zero_shot = (base or Thresholds()).zero_shot  # hybrid routing ignores it: kept

    def evaluate(high: float, low: float, proto: float) -> tuple:
        key = (float(high), float(min(low, high)), float(proto))
        if key not in seen:
            th = Thresholds(classifier_high=key[0], classifier_low=key[1], prototype=key[2],
                            zero_shot=zero_shot)
            cov, risk = risk_coverage(scored.reroute(th), truth)
            seen[key] = (_objective(cov, risk, target_coverage, max_risk), cov, risk)
        return seen[key]

    c_coarse, p_coarse = candidates(c_max, GRID), candidates(p_max, GRID)
    best = None
    for high, low, proto in itertools.product(c_coarse, c_coarse, p_coarse):
        if low > high:
            continue
        result = evaluate(high, low, proto)
        if best is None or result[0] < best[1][0]:
            best = ((float(high), float(low), float(proto)), result)
    c_fine, p_fine = candidates(c_max, FINE), candidates(p_max, FINE)
    for _ in range(3):  # coordinate refinement on fine candidates
        improved = False
        for axis, values in ((0, c_fine), (1, c_fine), (2, p_fine)):
            for v in values:
                point = list(best[0])
                point[axis] = float(v)
                if point[1] > point[0]:
                    continue
                result = evaluate(*point)
                if result[0] < best[1][0]:
                    best, improved = (tuple(point), result), True
        if not improved:
            break
    (high, low, proto), (key, cov, risk) = best
    thresholds = Thresholds(classifier_high=high, classifier_low=low, prototype=proto,
                            zero_shot=zero_shot)
    return thresholds, {"coverage": cov, "risk": risk, "target_met": key[0] == 0,
                        "settings_tried": len(seen)}


def fit_fusion_weights(bundle: Bundle, embeddings: np.ndarray, scored: ScoredSet
                       ) -> tuple[Bundle, dict]:
    """Routing fused: refit the head-side weights (their overall scale is the temperature)
    on this validation set; the new-species terms keep what training's simulation fitted."""
    cos, logits, c2g, knn = scored.components
    scorer = scored.scorer
    weights = fit_fusion(cos, logits, c2g, scorer.log_prior, knn, scored.truth,
                         scorer.weights, HEAD_TERMS if len(c2g) else ())
    after = scorer.with_weights(weights).from_components(cos, logits, c2g, knn)
    before_cal = top1_calibration(scored.distribution, scored.truth)
    after_cal = top1_calibration(after.distribution, scored.truth)
    fusion = {**bundle.fusion, "weights": weights.to_json()}
    return replace(bundle, fusion=fusion), {"fused": {
        "weights_before": scorer.weights.to_json(), "weights": weights.to_json(),
        "ece_before": before_cal[0], "ece_after": after_cal[0],
        "nll_before": before_cal[1], "nll_after": after_cal[1]}}


def group_thresholds(scored: ScoredSet, target_coverage: float | None = None,
                     max_risk: float | None = None, rare_max_risk: float | None = None,
                     base: Thresholds | None = None, flatten: float = FLATTEN
                     ) -> tuple[Thresholds, dict]:
    """Routing fused: a certified cut per photo group (tools/training/risk_control.py).

    ``--coverage C``: the lowest common risk level whose cuts answer C of the photos, each
    weighted ``n_species ** -flatten`` (a prior flatter than the calibration set's).
    ``--max-risk R`` (and ``--rare-max-risk``): each group's error among answers at most
    its target, with a Clopper–Pearson bound at 1 - DELTA, and the estimated share of
    out-of-catalog photos answered at most the rare target.
    """
    if (target_coverage is None) == (max_risk is None):
        raise ValueError("give exactly one of target_coverage and max_risk")
    base = base or Thresholds()
    conf = scored.routed.confidence
    wrong = scored.distribution.argmax(axis=1) != scored.truth
    groups = photo_groups(scored.distribution, scored.scores.species_group)
    outside = without_own_species(scored.distribution, scored.truth)
    if target_coverage is not None:
        weights = flatter_prior_weights(scored.truth, flatten)
        found, level = cuts_at_coverage(conf, wrong, groups, target_coverage, weights)
        rare = level
    else:  # and photos of species outside the catalog answered at most the rare target
        rare = max_risk if rare_max_risk is None else rare_max_risk
        out_conf = outside.max(axis=1) if len(outside) else np.zeros(0)
        found = within_outside_target(conf, wrong, groups, out_conf,
                                      photo_groups(outside, scored.scores.species_group),
                                      {"common": max_risk, "rare": rare, "runtime": rare},
                                      rare)
        level = max_risk
    thresholds = found.thresholds(base)
    routed = scored.reroute(thresholds)
    coverage, risk = risk_coverage(routed, scored.truth)
    answered = routed.species >= 0
    per_group = {}
    for group in SpeciesGroup:
        mine = groups == group
        n = int((answered & mine).sum())
        errors = int((answered & mine & (routed.species != scored.truth)).sum())
        per_group[group.name.lower()] = {
            "photos": int(mine.sum()), "answered": n, "errors": errors,
            "risk_bound": clopper_pearson_upper(errors, n) if n else None,
            "target": found.risk[group.name.lower()], "cut": found.cuts[group.name.lower()]}
    if target_coverage is not None:
        coverage = float(np.average(routed.species >= 0, weights=weights))
    met = coverage >= target_coverage - 1e-9 if target_coverage is not None else all(
        g["risk_bound"] is None or g["risk_bound"] <= g["target"] + 1e-12
        for g in per_group.values())
    outside_routed = route_fused(outside, thresholds, scored.scores.species_group)
    outside_answered = float((outside_routed.species >= 0).mean()) if len(outside) else 0.0
    return thresholds, {"coverage": coverage, "risk": risk, "target_met": bool(met),
                        # photos of uncatalogued species answered (all wrongly): an estimate,
                        # against the rare group's error target
                        "out_of_catalog_answered": outside_answered,
                        "out_of_catalog_target": rare,
                        "risk_level": level, "flatten": flatten, "groups": per_group,
                        "borrowed": list(found.borrowed),
                        "uncertified": list(found.uncertified), "settings_tried": len(RISK_GRID)}


def answer_threshold(scored: ScoredSet, target_coverage: float | None = None,
                     max_risk: float | None = None, base: Thresholds | None = None
                     ) -> tuple[Thresholds, dict]:
    """Routing fused, one cut for every photo (``--one-cut``): the cut on the answer's
    probability.

    ``--coverage C``: the highest cut answering at least C of the photos.
    ``--max-risk R``: the lowest cut whose answers are wrong at most R of the time
    (cuts only fall between distinct probabilities, so ties pass or fail together).
    """
    if (target_coverage is None) == (max_risk is None):
        raise ValueError("give exactly one of target_coverage and max_risk")
    base = base or Thresholds()
    conf = scored.routed.confidence
    n = len(conf)
    order = np.argsort(-conf, kind="stable")
    sorted_conf = conf[order]
    right = (scored.distribution.argmax(axis=1) == scored.truth)[order] if n else np.zeros(0)
    cum_risk = np.cumsum(~right) / np.arange(1, n + 1)
    distinct = np.append(sorted_conf[1:] < sorted_conf[:-1], True) if n else np.zeros(0, bool)
    if target_coverage is not None:
        k = min(n, max(1, int(np.ceil(target_coverage * n - 1e-9)))) if n else 0
        cut = float(sorted_conf[k - 1]) if k else 1.0
        met = k > 0
    else:
        ok = np.flatnonzero((cum_risk <= max_risk + 1e-12) & distinct)
        met = len(ok) > 0
        cut = float(sorted_conf[ok.max()]) if met else float(np.nextafter(
            sorted_conf[0] if n else 1.0, np.inf))
    thresholds = replace(base, answer=cut)
    routed = scored.reroute(thresholds)
    coverage, risk = risk_coverage(routed, scored.truth)
    return thresholds, {"coverage": coverage, "risk": risk, "target_met": bool(met),
                        "settings_tried": n}


# ------------------------------------------------------------ the command


def calibrate(bundle: Bundle, embeddings: np.ndarray, species: list[str], catalog: Catalog,
              target_coverage: float | None = None, max_risk: float | None = None,
              taxon_precision: float | str = DEFAULT_TAXON_PRECISION,
              fit_temperature: bool = True, rare_max_risk: float | None = None,
              one_cut: bool = False, flatten: float = FLATTEN) -> tuple[Bundle, dict]:
    """The steps on one calibration set; returns the new bundle and a report.

    A fused bundle's weights were fitted out of fold by ``train``: they are not
    refitted here, only its cuts (one per photo group unless ``one_cut``)."""
    scored_before = score_set(bundle, embeddings, species)
    cov0, risk0 = risk_coverage(scored_before.routed, scored_before.truth)
    routed_ece_before = ece(scored_before.routed.confidence[scored_before.accepted],
                            scored_before.correct[scored_before.accepted])
    report: dict = {"samples": len(species), "routing_name": bundle.routing,
                    "before": {"coverage": cov0, "risk": risk0, "ece": routed_ece_before,
                               "thresholds": bundle.thresholds.__dict__}}
    fused = isinstance(scored_before.scorer, FusedScorer)
    crossfitted = fused and "decision_families" in bundle.extra
    if fit_temperature and not crossfitted:
        fit = fit_fusion_weights if fused else fit_temperatures
        bundle, report["temperature"] = fit(bundle, embeddings, scored_before)
    scored = score_set(bundle, embeddings, species)
    if fused and not one_cut:
        thresholds, search = group_thresholds(scored, target_coverage, max_risk,
                                              rare_max_risk, bundle.thresholds, flatten)
    elif fused:
        thresholds, search = answer_threshold(scored, target_coverage, max_risk,
                                              bundle.thresholds)
    else:
        thresholds, search = search_thresholds(scored, target_coverage, max_risk,
                                               bundle.thresholds)
    scored = scored.with_thresholds(thresholds)
    bundle = replace(bundle, thresholds=thresholds)
    accepted = scored.accepted
    report["routing"] = {
        "target": ({"coverage": target_coverage} if target_coverage is not None
                   else {"max_risk": max_risk}),
        "thresholds": thresholds.__dict__, **search,
        "ece": ece(scored.routed.confidence[accepted], scored.correct[accepted]),
        "accuracy_accepted": 1.0 - search["risk"],
    }
    if taxon_precision == "auto":
        taxon_precision = max(0.5, 1.0 - search["risk"])
    taxon, taxon_report = fit_taxon_thresholds(scored, species, catalog, float(taxon_precision))
    bundle = replace(bundle, taxon_thresholds=taxon)
    outcome = fallback_outcomes(scored, species, catalog, bundle)
    taxon_report["validation"] = {
        "fallback_rate": outcome["fallbacks"] / max(len(species), 1),
        "fallback_accuracy": (outcome["correct"] / outcome["fallbacks"]
                              if outcome["fallbacks"] else None),
        "per_rank": outcome["per_rank"],
    }
    report["taxon"] = taxon_report
    return bundle, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--embeddings", type=Path, default=None,
                        help="calibration parquet (default: the calibration fold train kept "
                             "apart, BUNDLE/split/calibration.parquet, else split/val.parquet)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--coverage", type=float, default=None,
                        help=f"answer at least this share of photos (default "
                             f"{DEFAULT_COVERAGE}; fused: met by a 90 %% lower bound)")
    target.add_argument("--max-risk", type=float, default=None,
                        help="highest error rate allowed among answers (fused: among the "
                             "answers of photos whose mass lies on common species; the "
                             "estimated out-of-catalog answers are kept under the rare target)")
    parser.add_argument("--rare-max-risk", type=float, default=None,
                        help="fused, with --max-risk: the target of photos whose mass lies on "
                             "rare or runtime species (default: --max-risk)")
    parser.add_argument("--flatten", type=float, default=FLATTEN,
                        help="fused, with --coverage: count each calibration photo "
                             "n_species^-F, a prior flatter than the calibration set's "
                             "(0: as sampled, 1: every species alike; default %(default)s)")
    parser.add_argument("--one-cut", action="store_true",
                        help="fused: one cut for every photo instead of one per group")
    parser.add_argument("--taxon-precision", default=str(DEFAULT_TAXON_PRECISION),
                        help="precision rank-level answers must reach on validation, or 'auto' "
                             "(= the accepted species answers' precision)")
    parser.add_argument("--keep-temperature", action="store_true",
                        help="do not refit the head and prototype temperatures")
    parser.add_argument("--catalog", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    try:
        default = Path(args.bundle) / "split" / "calibration.parquet"
        split = "calibration" if args.embeddings is None and default.is_file() else "val"
        bundle, data, _ = load_labelled_split(args.bundle, args.embeddings, split)
    except (BundleError, DatasetError) as exc:
        log.error("%s", exc)
        return 2
    taxon_precision = args.taxon_precision
    if taxon_precision != "auto":
        taxon_precision = float(taxon_precision)
    coverage = args.coverage
    if coverage is None and args.max_risk is None:
        coverage = DEFAULT_COVERAGE
    catalog = Catalog.load(args.catalog) if args.catalog else Catalog.load_default()
    bundle, report = calibrate(bundle, data.embeddings, data.species, catalog,
                               target_coverage=coverage, max_risk=args.max_risk,
                               taxon_precision=taxon_precision,
                               fit_temperature=not args.keep_temperature,
                               rare_max_risk=args.rare_max_risk, one_cut=args.one_cut,
                               flatten=args.flatten)
    bundle.metrics = {**bundle.metrics, "calibration": report}
    bundle.save(Path(args.bundle))
    families = bundle.extra.get("decision_families")
    if families:
        print("decision family, chosen by train out of fold:")
        print("\n".join(family_lines(families["table"], families["chosen"])))
    _print(report)
    return 0 if report["routing"]["target_met"] else 3


def _print(report: dict) -> None:
    r = report["routing"]
    t = r["thresholds"]
    print(f"calibrated on {report['samples']} held-out photos")
    if "temperature" in report:
        for part, v in report["temperature"].items():
            print(f"  {part:9s} ECE {v['ece_before']:.3f} -> {v['ece_after']:.3f} after "
                  f"temperature scaling (NLL {v['nll_before']:.3f} -> {v['nll_after']:.3f})")
    b = report["before"]
    print(f"  routing   ECE {b['ece']:.3f} -> {r['ece']:.3f}; coverage {b['coverage']:.3f} -> "
          f"{r['coverage']:.3f}; error among answers {b['risk']:.3f} -> {r['risk']:.3f}")
    if report.get("routing_name") == "fused":
        for name, g in r.get("groups", {"all": {"cut": t["answer"]}}).items():
            line = f"  {name:8s} answer when its probability >= {g['cut']:.4f}"
            if "answered" in g:
                bound = g["risk_bound"]
                line += (f"  ({g['answered']}/{g['photos']} answered, {g['errors']} wrong"
                         + (f", error <= {bound:.3f} at 90 %" if bound is not None else "")
                         + (", borrowed" if name in r.get("borrowed", []) else "")
                         + (", too few to certify" if name in r.get("uncertified", [])
                            else "") + ")")
            print(line)
        if "out_of_catalog_answered" in r:
            print(f"  a photo of a species outside the catalog would get a (wrong) species "
                  f"answer ~{r['out_of_catalog_answered']:.0%} of the time (each calibration "
                  f"photo scored without its own species)")
            target = r.get("out_of_catalog_target")
            if target is not None and r["out_of_catalog_answered"] > target + 1e-12:
                print(f"    above the rare group's error target ({target:.0%}); "
                      "--max-risk keeps it under, at the cost of coverage")
    else:
        print(f"  thresholds classifier_high={t['classifier_high']:.4f} "
              f"classifier_low={t['classifier_low']:.4f} prototype={t['prototype']:.4f}")
    if not r["target_met"]:
        print(f"  WARNING: target {r['target']} not reachable on this data; closest kept")
    for rank, info in report["taxon"]["ranks"].items():
        if info.get("threshold") is not None:
            print(f"  {rank:7s} mass >= {info['threshold']:.3f} ({info['answers']} answers, "
                  f"precision {info['precision']:.2f}, >= {info['lower_bound']:.2f} at 90 %)")
        else:
            print(f"  {rank:7s} no rank answers: mean precision not certified "
                  f"({info.get('candidates', 0)} photos reach this rank)")
    v = report["taxon"]["validation"]
    if v["fallback_accuracy"] is not None:
        print(f"  rank fallback on {v['fallback_rate']:.1%} of photos, "
              f"right {v['fallback_accuracy']:.1%}")
