"""``biolit-id evaluate --observations FILE``: observations, not photos, on held-out data.

For each way of answering — the first photo alone, all photos (robust
tempered product), the pooled embedding, each with and without the place and
date — reports ``accuracy_all`` (rejections counted wrong), ``coverage``,
accuracy of the answers given, top-1 accuracy, NLL and the ECE of the
answers given (15 bins) and of every top-1. The answer is the combined
distribution's best species when its probability passes the combiner's
``answer`` cut (species level only: no genus fallback here). Breakdowns by
the file's ``set`` and ``role`` columns and by photo count; on the SYNTHETIC
sets of ``observations_synth`` the issue's targets are computed too.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from biolit_id.cli.training.calibration_metrics import ece
from biolit_id.cli.training.observation_data import ObservationSet, read_observations
from biolit_id.cli.training.observation_fit import (
    ScoredObservations,
    configuration,
    nll,
    score_observations,
)
from biolit_id.server.decision.observations import CombinerParams, photo_weight
from biolit_id.server.decision.prior import PRIOR_DIR, PRIOR_JSON, load_prior

log = logging.getLogger(__name__)

# name -> (photos, place and date)
CONFIGS: dict[str, tuple[str, bool]] = {
    "one_photo": ("first", False),
    "one_photo_place_date": ("first", True),
    "all_photos": ("all", False),
    "all_photos_place_date": ("all", True),
    "pooled": ("pooled", False),
    "pooled_place_date": ("pooled", True),
    "on_target_photos": ("on_target", False),  # synthetic oracle: the off-target photos removed
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ``evaluate`` gains (its --bundle, --out and --catalog are shared)."""
    parser.add_argument("--observations", type=Path, default=None,
                        help="evaluate observations (several photos, place, date) from this "
                             "parquet instead of photos")
    parser.add_argument("--prior", type=Path, default=None,
                        help="prior + combiner folder (default: BUNDLE/prior)")


def summarize(probs: np.ndarray, truth: np.ndarray, answer: float) -> dict:
    n = len(truth)
    if n == 0:
        return {"observations": 0}
    top = probs.argmax(axis=1)
    conf = probs[np.arange(n), top]
    accepted = conf >= answer
    right = top == truth
    correct = accepted & right
    return {
        "observations": n,
        "accuracy_all": float(correct.mean()),
        "coverage": float(accepted.mean()),
        "accuracy_accepted": float(correct.sum() / accepted.sum()) if accepted.any() else None,
        "top1_accuracy": float(right.mean()),
        "answered_correct": int(correct.sum()),
        "ece": ece(conf[accepted], right[accepted]),
        "ece_top1": ece(conf, right),
        "nll": nll(probs, truth),
    }


def evaluate(scored: ScoredObservations, params: CombinerParams) -> dict:
    data: ObservationSet = scored.data
    configs = dict(CONFIGS)
    if data.on_target.all():
        configs.pop("on_target_photos")
    if scored.density is None:
        configs = {k: v for k, v in configs.items() if not v[1]}
    probs = {name: configuration(scored, params, *spec) for name, spec in configs.items()}
    truth = scored.truth

    def table(rows: np.ndarray) -> dict:
        return {name: summarize(p[rows], truth[rows], params.answer) for name, p in probs.items()}

    everything = np.ones(len(data), dtype=bool)
    out: dict = {"observations": len(data), "photos": len(data.owner),
                 "with_place_or_date": int(data.has_place_or_date().sum()),
                 "params": {k: v for k, v in params.__dict__.items() if k != "fitted"},
                 "overall": table(everything), "by_photos": {}}
    counts = data.counts
    for n in sorted(set(counts.tolist())):
        out["by_photos"][str(n)] = table(counts == n)
    for column in ("set", "role"):
        values = np.asarray(data.columns.get(column, []), dtype=object)
        if len(values):
            out[f"by_{column}"] = {str(v): table(values == v) for v in sorted(set(values))}
    if {"set", "role"} <= set(data.columns):
        out["targets"] = targets(out, data, table)
        if "on_target_photos" in probs:
            out["targets"].update(stray_photo(scored, params, probs, data.columns["set"]))
    return out


def stray_photo(scored: ScoredObservations, params: CombinerParams, probs: dict,
                sets: list[str]) -> dict:
    """Two photos + one of another organism, beside what no combiner can beat.

    ``known_one_stray``: the posterior if one knew that exactly one of the three
    photos is off-target, not which (the average over the three pairs' tempered
    products): a bound for any rule that does not know which photo it is.
    ``confident_kept``: of the answers the two photos alone give right with
    confidence >= 0.9, the share still answered right with the stray photo.
    """
    rows = np.asarray(sets, dtype=object) == "two_plus_one"
    if not rows.any():
        return {}
    three = scored.data.padded(scored.photo_probs)[0][rows][:, :3]
    truth = scored.truth[rows]
    weight = float(photo_weight(2, params.rho))
    bound = sum((three[:, i] * three[:, j]) ** weight for i, j in ((0, 1), (0, 2), (1, 2)))
    bound = bound / bound.sum(axis=1, keepdims=True)
    alone, both = probs["on_target_photos"][rows], probs["all_photos"][rows]

    def right(q: np.ndarray, cut: float) -> np.ndarray:
        return (q.argmax(axis=1) == truth) & (q.max(axis=1) >= cut)

    confident = right(alone, 0.9)
    return {
        "two_plus_outlier_known_one_stray_bound": int(right(bound, params.answer).sum()),
        "two_confident_answers": int(confident.sum()),
        "two_confident_kept_with_outlier": int((confident & right(both, params.answer)).sum()),
    }


def targets(out: dict, data: ObservationSet, table) -> dict:
    """The issue's targets on the SYNTHETIC sets, in accuracy points (0-100)."""
    by_set = out["by_set"]
    found: dict = {}

    def points(a: dict, b: dict, key: str = "accuracy_all") -> float:
        return round(100.0 * (a[key] - b[key]), 2)

    if "three" in by_set:
        three = by_set["three"]
        found["three_photos_vs_first_points"] = points(three["all_photos"], three["one_photo"])
        found["three_photos_pooled_vs_first_points"] = points(three["pooled"],
                                                             three["one_photo"])
    if "two_plus_one" in by_set and "on_target_photos" in by_set["two_plus_one"]:
        two = by_set["two_plus_one"]
        found["two_plus_outlier_answered_correct"] = two["all_photos"]["answered_correct"]
        found["two_alone_answered_correct"] = two["on_target_photos"]["answered_correct"]
        found["two_plus_outlier_pooled_answered_correct"] = two["pooled"]["answered_correct"]
    sets = np.asarray(data.columns["set"], dtype=object)
    roles = np.asarray(data.columns["role"], dtype=object)
    mixed = sets == "mixed"
    if mixed.any() and "all_photos_place_date" in out["overall"]:
        for role in ("range", "season", "cooccurring", "distinct"):
            rows = mixed & (roles == role)
            if rows.any():
                t = table(rows)
                found[f"place_date_gain_{role}_points"] = points(t["all_photos_place_date"],
                                                                 t["all_photos"])
        t = table(mixed)
        found["ece_observation_answers"] = round(t["all_photos_place_date"]["ece"], 4)
        found["ece_observation_answers_photos_only"] = round(t["all_photos"]["ece"], 4)
    return found


def run(args: argparse.Namespace) -> int:
    from biolit_id.cli.training.datasets import DatasetError
    from biolit_id.server.decision.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.bundle)
        data = read_observations(args.observations)
    except (BundleError, DatasetError) as exc:
        log.error("%s", exc)
        return 2
    made_by = data.meta.get("model_fingerprint")
    if made_by and made_by != bundle.model_fingerprint:
        log.error("%s: embeddings made by model %s, the bundle's is %s", args.observations,
                  made_by, bundle.model_fingerprint)
        return 2
    folder = Path(args.prior) if args.prior else Path(args.bundle) / PRIOR_DIR
    prior = load_prior(folder) if (folder / PRIOR_JSON).is_file() else None
    params = CombinerParams.load(folder)
    metrics = evaluate(score_observations(bundle, data, prior), params)
    metrics["prior_version"] = prior.version if prior is not None else ""
    metrics["synthetic"] = bool(data.meta.get("synthetic"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "observations.json"
    path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False), "utf-8")
    print(f"evaluated {len(data)} observations ({metrics['photos']} photos)"
          f"{' [SYNTHETIC]' if metrics['synthetic'] else ''} -> {path}")
    print(f"  {'':24s} {'acc_all':>8s} {'coverage':>8s} {'acc_ans':>8s} {'ece':>7s}")
    for name, m in metrics["overall"].items():
        acc = m["accuracy_accepted"]
        print(f"  {name:24s} {m['accuracy_all']:8.4f} {m['coverage']:8.4f} "
              f"{'n/a' if acc is None else f'{acc:.4f}':>8s} {m['ece']:7.4f}")
    for key, value in metrics.get("targets", {}).items():
        print(f"  {key:44s} {value}")
    return 0
