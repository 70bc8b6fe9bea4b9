"""``biolit-id bench-quality``: the fused decision against the seed's method, on the long tail.

Per seed x label noise: train + calibrate (defaults) against the seed's
method re-trained on the same split, both through ``evaluate``'s code; then
species added at runtime (20 photos, the gallery's own prototype builder and
kNN) against the same species trained on. Synthetic (docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from biolit_id.cli.calibrate import calibrate
from biolit_id.cli.evaluate import compare, compute_metrics
from biolit_id.cli.evaluation.longtail import (
    DEFAULT_SEED_DIR,
    LongTail,
    LongTailSpec,
    generate,
    write,
)
from biolit_id.cli.evaluation.metrics import risk_coverage_curve, score_set
from biolit_id.cli.evaluation.report import write_report
from biolit_id.cli.train import build_bundle
from biolit_id.cli.training.calibration_metrics import ece
from biolit_id.cli.training.datasets import EmbeddingSet
from biolit_id.cli.training.head import HeadSettings
from biolit_id.index.core.types import PrototypeSet
from biolit_id.index.prototypes import PrototypeBuilder
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import Bundle
from biolit_id.server.decision.fused import RUNTIME_PHOTOS, neighbour_similarity

log = logging.getLogger(__name__)

SEED_METHOD_HEAD = HeadSettings(rare_negatives=0.0)  # the seed's head (docs/seed-v4.md), as trained
RUNTIME_SPECIES = 6


def fused_bundle(train: EmbeddingSet, val: EmbeddingSet, loaded, catalog: Catalog,
                 seed: int) -> Bundle:
    """``biolit-id train`` then ``calibrate --coverage 0.88``, with their defaults."""
    bundle = build_bundle(train, val, loaded, catalog, seed=seed, progress=False)
    bundle, _ = calibrate(bundle, val.embeddings, val.species, catalog, target_coverage=0.88)
    return bundle


def seed_method_bundle(data: LongTail, loaded, catalog: Catalog, seed: int) -> Bundle:
    """The seed's recipe on this split. alpha 1.0: the demo model's text tower is random,
    and text would only blur the seed's prototypes (ours fits alpha and picks 1.0)."""
    return build_bundle(data.train, data.val, loaded, catalog, alpha=1.0, seed=seed,
                        head=SEED_METHOD_HEAD, progress=False, routing="seed")


def runtime_species(data: LongTail, k: int, seed: int) -> list[str]:
    """Species with at least 20 training and 3 test photos, half common and half rare."""
    train, test = data.train.counts(), data.test.counts()
    ok = [s for s in data.species if train.get(s, 0) >= RUNTIME_PHOTOS and test.get(s, 0) >= 3]
    rng = np.random.default_rng(seed + 101)
    common = [s for s in ok if s in data.common]
    rare = [s for s in ok if s not in data.common]
    half = k // 2
    pick = list(rng.choice(common, min(half, len(common)), replace=False))
    pick += list(rng.choice(rare, min(k - len(pick), len(rare)), replace=False))
    return sorted(str(s) for s in pick)


def without(data: EmbeddingSet, species: set[str]) -> EmbeddingSet:
    return data.subset([i for i, s in enumerate(data.species) if s not in species])


def capped(data: EmbeddingSet, species: set[str], n: int) -> EmbeddingSet:
    """``data`` where each of ``species`` keeps only its first ``n`` photos."""
    seen: dict[str, int] = {}
    rows = []
    for i, s in enumerate(data.species):
        if s in species:
            seen[s] = seen.get(s, 0) + 1
            if seen[s] > n:
                continue
        rows.append(i)
    return data.subset(rows)


def add_at_runtime(bundle: Bundle, train: EmbeddingSet, species: list[str], loaded,
                   catalog: Catalog):
    """(PrototypeSet, neighbours) after 20 photos of each species came in by AddExemplars:
    the gallery's prototype builder, and the kNN term over those photos."""
    def text_for(names: list[str]) -> np.ndarray:
        return bundle.whiten(loaded.encode_text([catalog.prompt_for(n) for n in names]))

    builder = PrototypeBuilder(base_names=tuple(bundle.species), base_vectors=bundle.prototypes,
                               text_for=text_for, alpha=bundle.alpha,
                               visual_prior=bundle.visual_prototypes,
                               text_base=bundle.text_prototypes)
    photos = {}
    vectors = [bundle.prototypes]
    for name in species:
        rows = [i for i, s in enumerate(train.species) if s == name][:RUNTIME_PHOTOS]
        photos[name] = bundle.whiten(train.embeddings[rows])
        vectors.append(builder.fused(name, photos[name])[None, :])
    protos = PrototypeSet((*bundle.species, *species), np.concatenate(vectors).astype(np.float32))

    def neighbours(embeddings: np.ndarray, names) -> np.ndarray:
        return neighbour_similarity(bundle.whiten(embeddings),
                                    [photos.get(n, np.zeros((0, protos.vectors.shape[1])))
                                     for n in names])

    return protos, neighbours


def species_accuracy(scored, species: list[str], names: list[str]) -> dict[str, dict]:
    """Per species: top-1 accuracy and accuracy with rejections counted wrong."""
    out = {}
    guess = scored.distribution.argmax(axis=1)
    for name in species:
        mask = np.array([s == name for s in names])
        target = scored.names.index(name) if name in scored.names else -2
        out[name] = {"top1": float((guess[mask] == target).mean()),
                     "answered_right": float(scored.correct[mask].mean()),
                     "photos": int(mask.sum())}
    return out


def runtime_experiment(data: LongTail, full: Bundle, loaded, catalog: Catalog,
                       seed: int, k: int = RUNTIME_SPECIES) -> dict:
    held = runtime_species(data, k, seed)
    held_set = set(held)
    test = data.test
    # Trained and calibrated as if these species did not exist yet.
    minus = fused_bundle(without(data.train, held_set), without(data.val, held_set), loaded,
                         catalog, seed)
    protos, neighbours = add_at_runtime(minus, data.train, held, loaded, catalog)
    runtime = score_set(minus, test.embeddings, test.species, protos=protos,
                        neighbours=neighbours)
    control = fused_bundle(capped(data.train, held_set, RUNTIME_PHOTOS), data.val, loaded,
                           catalog, seed)
    results = {
        "species": held,
        "runtime": species_accuracy(runtime, held, test.species),
        "trained_on_same_20": species_accuracy(score_set(control, test.embeddings,
                                                         test.species), held, test.species),
        "trained_on_all": species_accuracy(score_set(full, test.embeddings, test.species),
                                           held, test.species),
    }
    mask = np.isin(np.asarray(test.species), held)
    answered = runtime.accepted & mask
    results["runtime_answered_share"] = float(answered.sum() / max(mask.sum(), 1))
    results["runtime_ece"] = ece(runtime.routed.confidence[answered], runtime.correct[answered])
    # Do the new species steal answers? Photos of other species answered as one of them.
    as_new = runtime.accepted & np.isin(runtime.routed.species,
                                        [runtime.names.index(n) for n in held])
    results["runtime_answers"] = int(as_new.sum())
    results["runtime_answers_right"] = float(runtime.correct[as_new].mean()) if as_new.any() \
        else None
    results["all_photos"] = {"coverage": float(runtime.accepted.mean()),
                             "accuracy": float(runtime.correct.sum() / max(runtime.accepted.sum(),
                                                                           1))}
    for key in ("runtime", "trained_on_same_20", "trained_on_all"):
        per = results[key]
        results[f"{key}_mean_top1"] = float(np.mean([v["top1"] for v in per.values()]))
    results["ratio_vs_same_20"] = results["runtime_mean_top1"] / max(
        results["trained_on_same_20_mean_top1"], 1e-9)
    results["ratio_vs_all"] = results["runtime_mean_top1"] / max(
        results["trained_on_all_mean_top1"], 1e-9)
    return results


def one_setting(out: Path, spec: LongTailSpec, loaded, catalog: Catalog,
                seed_dir: Path, runtime: bool) -> dict:
    data = generate(spec, catalog, seed_dir)
    info = write(out / "data", data)
    fused = fused_bundle(data.train, data.val, loaded, catalog, spec.seed)
    seed_b = seed_method_bundle(data, loaded, catalog, spec.seed)
    fused.save(out / "fused")
    seed_b.save(out / "seed-method")
    test = data.test
    scored = score_set(fused, test.embeddings, test.species)
    metrics = compute_metrics(fused, test, scored, catalog, common=data.common)
    seed_scored = score_set(seed_b, test.embeddings, test.species)
    metrics["compare_seed"] = compare(seed_b, test, seed_scored, catalog, metrics)
    cov, risk = risk_coverage_curve(scored)
    seed_cov, seed_risk = risk_coverage_curve(seed_scored)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    write_report(report, metrics, {"coverage": cov, "risk": risk, "seed": {
        "coverage": seed_cov, "risk": seed_risk, "label": "seed's method, re-trained"}}, fused)
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    result = {"seed": spec.seed, "label_noise": spec.label_noise, "data": info,
              "fused": summary(metrics), "seed_method": summary(metrics["compare_seed"])}
    if runtime:
        result["runtime_species"] = runtime_experiment(data, fused, loaded, catalog, spec.seed)
    return result


def summary(m: dict) -> dict:
    at = m["at_coverage"]
    return {
        "coverage": m["coverage"], "accuracy": m["accuracy_global"],
        "accuracy_common": m["accuracy_common"], "accuracy_rare": m["accuracy_rare"],
        "ece": m["ece"], "aurc": m["aurc"], "rank_answers": m["rank_answers"],
        "rank_answer_precision": m["rank_answer_precision"],
        **{f"at_{c}": {k: at[c][k] for k in ("accuracy", "accuracy_common", "accuracy_rare")}
           for c in at},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None,
                        help="model spec for text prompts (default: a demo model under OUT)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.03, 0.08])
    parser.add_argument("--no-runtime", action="store_true",
                        help="skip the species-added-at-runtime experiment (3 more trainings)")
    parser.add_argument("--seed-dir", type=Path, default=DEFAULT_SEED_DIR)


def run(args: argparse.Namespace) -> int:
    from biolit_id.cli.demo_model import write_demo_model
    from biolit_id.server.inference.model_loader import load_model

    out = Path(args.out)
    spec = args.model
    if spec is None:
        spec = f"local-dir:{write_demo_model(out / 'demo-model')}"
    loaded = load_model(spec)
    catalog = Catalog.load_default()
    results = []
    for seed in args.seeds:
        for noise in args.noise:
            where = out / f"seed{seed}-noise{noise:.2f}"
            log.info("SYNTHETIC long tail seed %d, label noise %.2f -> %s", seed, noise, where)
            results.append(one_setting(where, LongTailSpec(seed=seed, label_noise=noise),
                                       loaded, catalog, args.seed_dir, not args.no_runtime))
            (out / "results.json").write_text(json.dumps(
                {"synthetic": True, "results": results}, indent=2, ensure_ascii=False))
    print(table(results))
    return 0


def table(results: list[dict]) -> str:
    """The markdown table docs/quality.md quotes."""
    lines = ["| seed | noise | method | coverage | acc | common | rare | acc@0.88 | rare@0.88 | "
             "ECE | AURC | rank answers (right) |", "|" + "---|" * 12]
    for r in results:
        for name, m in (("fused", r["fused"]), ("seed's method", r["seed_method"])):
            rank = (f"{m['rank_answers']} ({_f(m['rank_answer_precision'])})")
            lines.append(
                f"| {r['seed']} | {r['label_noise']:.2f} | {name} | {_f(m['coverage'])} | "
                f"{_f(m['accuracy'])} | {_f(m['accuracy_common'])} | {_f(m['accuracy_rare'])} "
                f"| {_f(m['at_0.88']['accuracy'])} | {_f(m['at_0.88']['accuracy_rare'])} | "
                f"{_f(m['ece'])} | {_f(m['aurc'])} | {rank} |")
    runtime = [r["runtime_species"] for r in results if "runtime_species" in r]
    if runtime:
        lines += ["", "| seed | noise | runtime top-1 | trained on same 20 | trained on all | "
                  "ratio (same 20) | ratio (all) |", "|" + "---|" * 7]
        for r in results:
            rt = r.get("runtime_species")
            if rt:
                lines.append(
                    f"| {r['seed']} | {r['label_noise']:.2f} | {_f(rt['runtime_mean_top1'])} | "
                    f"{_f(rt['trained_on_same_20_mean_top1'])} | "
                    f"{_f(rt['trained_on_all_mean_top1'])} | {_f(rt['ratio_vs_same_20'])} | "
                    f"{_f(rt['ratio_vs_all'])} |")
    return "\n".join(lines)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
