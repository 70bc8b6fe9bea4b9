"""``bench-quality``'s library: realistic synthetic data, the commands a user runs, every
figure with a bootstrap interval.

Per generator (the second generation's ``longtail_realistic.py`` at two
difficulties, the first generation's ``realistic_v4``) and seed: generate; run
``train`` (defaults) -> ``calibrate`` (defaults) -> ``evaluate`` through the
commands' own argument parsers, beside the seed's method re-trained on the same
split (``train --routing seed --rare-negatives 0 --alpha 1.0``), three simple
baselines (``evaluation.baselines``) and every served family of our bundle
(``evaluation.family_variants``, each run through ``calibrate``). Everything is
fitted on train and validation; test photos only report. Synthetic embeddings, not photos.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biolit_id.cli.evaluation.baselines import Baseline, baselines
from biolit_id.cli.evaluation.bootstrap import bootstrap
from biolit_id.cli.evaluation.family_variants import write_family_variants
from biolit_id.cli.evaluation.metrics import ScoredSet, rank_answers, score_set, taxon_is_right
from biolit_id.cli.evaluation.realistic_v4 import SHARED, RealisticSpec
from biolit_id.cli.evaluation.realistic_v4 import generate as generate_v4
from biolit_id.cli.training.calibration_metrics import ece
from biolit_id.cli.training.datasets import (
    embedding_column,
    read_embeddings,
    read_table,
    write_table,
)
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import load_bundle
from biolit_id.server.decision.ranks import taxon_fallback

log = logging.getLogger(__name__)

DEFAULT_V2_SCRIPT = SHARED / "benchmarks" / "longtail_realistic.py"
COMMON_N = 50  # rare = not among the 50 most frequent training species (train's rule)
SEED_METHOD_ARGS = ("--routing", "seed", "--rare-negatives", "0", "--alpha", "1.0")
QUICK_TRAIN_ARGS = ("--epochs", "3", "--patience", "1")
QUICK_CAPS = {"train": 10, "val": 5, "test": 4}  # photos per species and split (v2, quick)
QUICK_V4_SCALE = 0.1
FAMILY_KEYS = ("decision_families", "oof", "out_of_fold")
FIGURES = ("coverage", "accuracy", "accuracy_rare", "accuracy_common", "ece", "aurc",
           "rank_answer_rate", "rank_precision", "ooc_species_answer_rate",
           "ooc_rank_answer_rate", "ooc_rank_precision")
LOWER_IS_BETTER = {"ece", "aurc", "ooc_species_answer_rate"}
METHODS = ("ours", "seed_method", "cosine", "lda", "knn")
FAMILY_PREFIX = "ours:"  # each served family of our bundle, calibrated alike (family_variants)
METHOD_LABELS = {"ours": "ours (train → calibrate, defaults)",
                 "seed_method": "seed's method, re-trained (cascade 0.80/0.40)",
                 "cosine": "class-mean cosine (whitened on train)",
                 "lda": "shrinkage LDA (whitened on train)",
                 "knn": "exemplar kNN, mean cosine of the 3 nearest training photos"}


@dataclass(frozen=True)
class Generator:
    """One benchmark family: ``v2`` (longtail_realistic.py, 768-d) or ``v4`` (512-d)."""

    name: str
    kind: str
    difficulty: float

    @property
    def dim(self) -> int:
        return 768 if self.kind == "v2" else 512


GENERATORS = (Generator("v2-d1.0", "v2", 1.0), Generator("v2-d1.2", "v2", 1.2),
              Generator("v4", "v4", 1.0))


# ------------------------------------------------------------ data


def load_v2_generator(script: Path):
    """``longtail_realistic.py`` as a module, loaded from its path at run time."""
    script = Path(script)
    if not script.is_file():
        raise FileNotFoundError(f"{script}: the realistic benchmark generator is not there "
                                "(--v2-generator)")
    spec = importlib.util.spec_from_file_location("longtail_realistic", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_split(path: Path, species: Sequence[str], emb: np.ndarray, inside: np.ndarray,
                 meta: dict) -> None:
    import pyarrow as pa

    write_table(path, {"species": pa.array(list(species), type=pa.string()),
                       "embedding": embedding_column(emb),
                       "in_catalog": pa.array(np.asarray(inside, bool), type=pa.bool_())}, meta)


def _read_split(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    table = read_table(path, ("species", "embedding", "in_catalog"), "benchmark split")
    data = read_embeddings(path)
    return data.species, data.embeddings, np.asarray(table.column("in_catalog").to_pylist(), bool)


def _capped(species: Sequence[str], cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Rows keeping at most ``cap`` photos per species (all rows when ``cap`` is None)."""
    if cap is None:
        return np.arange(len(species))
    labels = np.asarray(species, dtype=object)
    keep = [rng.permutation(np.flatnonzero(labels == s))[:cap] for s in sorted(set(species))]
    return np.sort(np.concatenate(keep))


def prepare(generator: Generator, seed: int, out: Path, catalog: Catalog, v2_script: Path,
            quick: bool = False) -> dict:
    """Generate one data set into ``out/{train,val,test}.parquet`` under the catalog's names."""
    from biolit_id.cli.seedcompat.import_v2 import names_for

    out = Path(out)
    raw = out / "generated"
    if generator.kind == "v4":
        spec = RealisticSpec(seed=seed, difficulty=generator.difficulty,
                             scale=QUICK_V4_SCALE if quick else 1.0)
        info = generate_v4(raw, spec, catalog)
    else:
        info = load_v2_generator(v2_script).generate(str(raw), seed, generator.difficulty)
    rng = np.random.default_rng(seed)
    counts = {}
    for split in ("train", "val", "test"):
        species, emb, inside = _read_split(raw / f"{split}.parquet")
        rename = names_for(sorted(set(species)), catalog)  # v2 spells names in lower case
        rows = _capped(species, QUICK_CAPS[split] if quick and generator.kind == "v2" else None,
                       rng)
        meta = {"synthetic": generator.name, "seed": seed, "difficulty": generator.difficulty}
        _write_split(out / f"{split}.parquet", [rename[species[i]] for i in rows], emb[rows],
                     inside[rows], meta)
        (raw / f"{split}.parquet").unlink()
        counts[split] = len(rows)
    return {"generated": info, "counts": counts}


# ------------------------------------------------------------ the commands


def cli(argv: Sequence[str], log_path: Path) -> int:
    """Run one ``biolit-id`` command in-process, exactly as parsed from ``argv``."""
    from biolit_id.cli.main import build_parser

    argv = [str(a) for a in argv]
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = int(module.run(args) or 0)
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"$ biolit-id {' '.join(argv)}\n{buffer.getvalue()}[exit {rc}]\n")
    return rc


def _check(rc: int, argv: Sequence[str], allowed: tuple[int, ...] = (0,)) -> None:
    if rc not in allowed:
        raise RuntimeError(f"biolit-id {' '.join(map(str, argv))} exited {rc}")


# ------------------------------------------------------------ per-photo outcomes


@dataclass
class Outcomes:
    """One method on the test photos, photo by photo."""

    answered: np.ndarray  # a species answer
    right: np.ndarray  # ... and it is the label
    confidence: np.ndarray  # the decision's confidence (the cut is on it)
    guess_right: np.ndarray  # the best guess is the label (risk-coverage curve)
    rank_answered: np.ndarray  # a rank answer instead of a species
    rank_right: np.ndarray  # ... whose taxon contains the labelled species

    @staticmethod
    def concat(parts: Sequence[Outcomes]) -> Outcomes:
        return Outcomes(*(np.concatenate([getattr(p, f) for p in parts])
                          for f in ("answered", "right", "confidence", "guess_right",
                                    "rank_answered", "rank_right")))


@dataclass
class TestPhotos:
    species: list[str]
    in_catalog: np.ndarray
    rare: np.ndarray  # in the catalog, and its label is a rare species

    @staticmethod
    def concat(parts: Sequence[TestPhotos]) -> TestPhotos:
        return TestPhotos([s for p in parts for s in p.species],
                          np.concatenate([p.in_catalog for p in parts]),
                          np.concatenate([p.rare for p in parts]))


def outcomes(scored: ScoredSet, species: Sequence[str], catalog: Catalog,
             thresholds_of) -> Outcomes:
    """Species answers from ``scored``; for rejected photos the rank answer ``serve`` gives
    with ``thresholds_of.taxon_thresholds`` (a bundle or a baseline)."""
    n = len(scored)
    rank_answered, rank_right = np.zeros(n, bool), np.zeros(n, bool)
    rejected = np.flatnonzero(~scored.accepted)
    for row, ranks in zip(rejected, rank_answers(scored, rejected, catalog), strict=True):
        chosen = taxon_fallback(ranks, thresholds_of)
        if chosen is not None:
            rank_answered[row] = True
            rank_right[row] = taxon_is_right(chosen, species[int(row)], catalog)
    guess = np.where(scored.accepted, scored.routed.species, scored.distribution.argmax(axis=1))
    return Outcomes(scored.accepted.copy(), scored.correct.copy(),
                    np.asarray(scored.routed.confidence, np.float64),
                    guess == scored.truth, rank_answered, rank_right)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


def _aurc(confidence: np.ndarray, guess_right: np.ndarray) -> float:
    if not len(confidence):
        return float("nan")
    order = np.argsort(-confidence, kind="stable")
    wrong = ~guess_right[order]
    return float((np.cumsum(wrong) / np.arange(1, len(order) + 1)).mean())


def figures(o: Outcomes, t: TestPhotos, idx: np.ndarray) -> dict[str, float]:
    """Every figure over the test rows ``idx`` (a bootstrap resample or all rows).

    Coverage, accuracies, ECE, AURC and rank answers are over in-catalog photos;
    ``ooc_*`` over photos of species the catalog lacks.
    """
    inside, outside = idx[t.in_catalog[idx]], idx[~t.in_catalog[idx]]
    ans = inside[o.answered[inside]]
    rare = ans[t.rare[ans]]
    common = ans[~t.rare[ans]]
    unanswered = inside[~o.answered[inside]]
    ranked = unanswered[o.rank_answered[unanswered]]
    ooc_ranked = outside[o.rank_answered[outside]]
    return {
        "coverage": _mean(o.answered[inside]),
        "accuracy": _mean(o.right[ans]),
        "accuracy_rare": _mean(o.right[rare]),
        "accuracy_common": _mean(o.right[common]),
        "ece": ece(o.confidence[ans], o.right[ans]) if len(ans) else float("nan"),
        "aurc": _aurc(o.confidence[inside], o.guess_right[inside]),
        "rank_answer_rate": _mean(o.rank_answered[inside]),
        "rank_precision": _mean(o.rank_right[ranked]),
        "ooc_species_answer_rate": _mean(o.answered[outside]),
        "ooc_rank_answer_rate": _mean(o.rank_answered[outside]),
        "ooc_rank_precision": _mean(o.rank_right[ooc_ranked]),
    }


@dataclass
class SettingRun:
    """One generated data set and every method's outcomes on its test photos."""

    generator: str
    seed: int
    test: TestPhotos
    outcomes: dict[str, Outcomes]
    info: dict = field(default_factory=dict)


def compare(runs: Sequence[SettingRun], resamples: int, seed: int = 0) -> dict:
    """Per method, every figure with its interval, pooled over ``runs`` (test photos
    resampled within each run); and each method minus ours, paired on the same resamples."""
    sizes = [len(r.test.species) for r in runs]
    offsets = np.cumsum([0, *sizes])
    test = TestPhotos.concat([r.test for r in runs])
    methods = [m for m in dict.fromkeys([*METHODS, *runs[0].outcomes])
               if all(m in r.outcomes for r in runs)]
    pooled = {m: Outcomes.concat([r.outcomes[m] for r in runs]) for m in methods}

    def statistic(draw: Sequence[np.ndarray]) -> dict[str, float]:
        idx = np.concatenate([d + offsets[i] for i, d in enumerate(draw)])
        out = {}
        per = {m: figures(pooled[m], test, idx) for m in methods}
        for m in methods:
            out.update({f"{m}/{k}": v for k, v in per[m].items()})
            if m != "ours" and "ours" in per:
                out.update({f"{m}-ours/{k}": v - per["ours"][k] for k, v in per[m].items()})
        return out

    values, widened = bootstrap(statistic, sizes, resamples, seed)
    result: dict = {"methods": {}, "minus_ours": {}, "widened": widened,
                    "photos": {"in_catalog": int(test.in_catalog.sum()),
                               "out_of_catalog": int((~test.in_catalog).sum()),
                               "rare": int(test.rare.sum())}}
    for key, v in values.items():
        head, fig = key.split("/")
        group = "minus_ours" if head.endswith("-ours") else "methods"
        result[group].setdefault(head.removesuffix("-ours"), {})[fig] = v
    result["simpler_wins"] = simpler_wins(result)
    return result


def simpler_wins(result: dict) -> list[str]:
    """Figures where another method beats ours with an interval of the paired
    difference that excludes zero."""
    wins = []
    for method, diffs in result["minus_ours"].items():
        for fig, (d, lo, hi) in diffs.items():
            if fig in ("coverage", "accuracy_common", "ooc_rank_answer_rate") or not np.isfinite(d):
                continue
            better = hi < 0 if fig in LOWER_IS_BETTER else lo > 0
            if better:
                cov = (result["methods"][method]["coverage"][0],
                       result["methods"]["ours"]["coverage"][0])
                wins.append(f"{method} beats ours on {fig}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                            f"(coverage {cov[0]:.3f} vs ours {cov[1]:.3f})")
    return wins


# ------------------------------------------------------------ one data set


def decision_families(bundle) -> dict | None:
    """The out-of-fold table of decision families ``train`` recorded, if it did."""
    for where in (bundle.extra, bundle.metrics, bundle.metrics.get("validation") or {}):
        for key in FAMILY_KEYS:
            if isinstance(where, dict) and where.get(key):
                return where[key]
    return None


DONE = "done.json"  # written once a data set's commands have all run (``--resume``)


def run_setting(generator: Generator, seed: int, out: Path, model: str, catalog: Catalog,
                v2_script: Path, quick: bool = False, resume: bool = False) -> SettingRun:
    """Generate, train/calibrate/evaluate as a user would, the seed's method, the baselines.

    ``resume``: a data set whose commands all ran before (``DONE`` in ``out``) is not
    generated or trained again; its bundles are scored anew."""
    t0 = time.monotonic()
    out = Path(out)
    data = out / "data"
    if resume and (out / DONE).is_file():
        info = json.loads((out / DONE).read_text("utf-8"))
        info["resumed"] = True
    else:
        info = _run_commands(generator, seed, out, model, catalog, v2_script, quick)
    return _score(generator, seed, out, data, catalog, info, t0)


def _run_commands(generator: Generator, seed: int, out: Path, model: str, catalog: Catalog,
                  v2_script: Path, quick: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    started = time.monotonic()
    info = prepare(generator, seed, data, catalog, v2_script, quick)
    logs = out / "commands.log"
    train, val, test_path = (data / f"{s}.parquet" for s in ("train", "val", "test"))
    extra = list(QUICK_TRAIN_ARGS) if quick else []
    common = ["--embeddings", train, "--val", val, "--model", model, "--seed", seed,
              "--no-progress", *extra]
    steps = [(["train", *common, "--out", out / "ours"], (0,)),
             (["calibrate", "--bundle", out / "ours"], (0, 3)),  # the fold train kept apart
             (["train", *common, *SEED_METHOD_ARGS, "--out", out / "seed-method"], (0,)),
             (["evaluate", "--bundle", out / "ours", "--embeddings", test_path, "--out",
               out / "report", "--compare-seed", out / "seed-method"], (0,))]
    for argv, allowed in steps:
        _check(cli(argv, logs), argv, allowed)
    info["commands_seconds"] = time.monotonic() - started
    (out / DONE).write_text(json.dumps(info, default=_json_default), "utf-8")
    return info


def _score(generator: Generator, seed: int, out: Path, data: Path, catalog: Catalog,
           info: dict, t0: float) -> SettingRun:
    from biolit_id.cli.training.features import choose_common

    train, val, test_path = (data / f"{s}.parquet" for s in ("train", "val", "test"))
    train_set, val_set, test_set = (read_embeddings(p) for p in (train, val, test_path))
    _, _, inside = _read_split(test_path)
    rare_species = set(train_set.counts()) - choose_common(train_set.counts(), COMMON_N, None)
    photos = TestPhotos(test_set.species, inside,
                        inside & np.isin(np.asarray(test_set.species, dtype=object),
                                         sorted(rare_species)))
    results: dict[str, Outcomes] = {}
    fits: dict[str, dict] = {}
    for name, where in (("ours", out / "ours"), ("seed_method", out / "seed-method")):
        bundle = load_bundle(where)
        scored = score_set(bundle, test_set.embeddings, test_set.species)
        results[name] = outcomes(scored, test_set.species, catalog, bundle)
        fits[name] = {"routing": bundle.routing, "thresholds": bundle.thresholds.__dict__,
                      "taxon_thresholds": bundle.taxon_thresholds}
        if name == "ours":
            fits[name]["decision_families"] = decision_families(bundle)
            fits[name]["calibration"] = (bundle.metrics.get("calibration") or {}).get("routing")
    calibration = out / "ours" / "split" / "calibration.parquet"
    for family, where in write_family_variants(out / "ours", train_set, val_set, seed,
                                               out / "families").items():
        argv = ["calibrate", "--bundle", where, "--embeddings", calibration]
        _check(cli(argv, out / "families.log"), argv, (0, 3))
        variant = load_bundle(where)
        scored = score_set(variant, test_set.embeddings, test_set.species)
        results[FAMILY_PREFIX + family] = outcomes(scored, test_set.species, catalog, variant)
    simple: dict[str, Baseline] = baselines(train_set, val_set, catalog)
    for name, b in simple.items():
        scored = b.scored(test_set.embeddings, test_set.species)
        results[name] = outcomes(scored, test_set.species, catalog, b)
        fits[name] = b.fit_info
    info.update(fits=fits, seconds=time.monotonic() - t0,
                rare_species=len(rare_species), report=str(out / "report"))
    return SettingRun(generator.name, seed, photos, results, info)


# ------------------------------------------------------------ report


def _cell(v: Sequence[float] | None) -> str:
    if v is None or not np.isfinite(v[0]):
        return "n/a"
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def table(pooled: dict[str, dict]) -> str:
    """Markdown: per generator and method, every figure with its 95 % interval."""
    lines = ["| data | method | coverage | accuracy | rare acc | ECE | AURC | rank answers "
             "(precision) | out-of-catalog species answers |", "|" + "---|" * 9]
    for gen, res in pooled.items():
        for m, f in res["methods"].items():
            lines.append(f"| {gen} | {m} | {_cell(f['coverage'])} | {_cell(f['accuracy'])} | "
                         f"{_cell(f['accuracy_rare'])} | {_cell(f['ece'])} | "
                         f"{_cell(f['aurc'])} | {_cell(f['rank_answer_rate'])} "
                         f"({_cell(f['rank_precision'])}) | "
                         f"{_cell(f['ooc_species_answer_rate'])} |")
    wins = [f"* {gen}: {w}" for gen, res in pooled.items() for w in res["simpler_wins"]]
    if wins:
        lines += ["", "Where another method beats ours (paired difference, 95 % interval "
                  "excludes 0):", *wins]
    return "\n".join(lines)


def family_table(runs: Sequence[SettingRun]) -> str:
    """The out-of-fold decision-family tables ``train`` recorded, one per data set."""
    lines = []
    for r in runs:
        fam = r.info["fits"]["ours"].get("decision_families")
        rows = fam.get("table") if isinstance(fam, dict) else None
        if not rows or not isinstance(rows, list):
            continue
        keys = [k for k, v in rows[0].items()
                if k not in ("family", "needs_head") and not isinstance(v, dict | list)]
        lines += [f"\n{r.generator} seed {r.seed}: chosen {fam.get('chosen')} (out of fold, "
                  "fitting rows only)", "| family | " + " | ".join(keys) + " |",
                  "|" + "---|" * (len(keys) + 1)]
        for row in rows:
            cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
            lines.append(f"| {row.get('family')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, runs: Sequence[SettingRun]) -> None:
    """Per generator (its first seed), as one cut on each method's confidence moves:
    top, risk against coverage (in-catalog test photos), the dot the method's own
    operating point; bottom, the share of out-of-catalog photos given a species answer
    against the same coverage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first: dict[str, SettingRun] = {}
    for r in runs:
        first.setdefault(r.generator, r)
    fig, axes = plt.subplots(2, len(first), figsize=(5.2 * len(first), 8.0), squeeze=False)
    for col, (gen, r) in enumerate(first.items()):
        ax, ax_ooc = axes[0][col], axes[1][col]
        inside = r.test.in_catalog
        for m, o in r.outcomes.items():
            if m.startswith(FAMILY_PREFIX):  # the families' curves: table.md
                continue
            order = np.argsort(-o.confidence[inside], kind="stable")
            wrong = ~o.guess_right[inside][order]
            k = np.arange(1, len(order) + 1)
            line, = ax.plot(k / len(order), np.cumsum(wrong) / k, lw=1.6, label=m)
            ans = o.answered[inside]
            if ans.any():
                ax.scatter([ans.mean()], [1 - o.right[inside][ans].mean()], s=36,
                           color=line.get_color(), edgecolors="black", zorder=3)
            cuts = np.sort(o.confidence[inside])[::-1]
            outside = o.confidence[~inside]
            if len(outside):
                ax_ooc.plot(k / len(order), (outside[None, :] >= cuts[:, None]).mean(axis=1),
                            lw=1.6, color=line.get_color(), label=m)
                ax_ooc.scatter([ans.mean()], [o.answered[~inside].mean()], s=36,
                               color=line.get_color(), edgecolors="black", zorder=3)
        ax.set_title(f"{gen}, seed {r.seed} (synthetic)")
        ax.set_ylabel("risk (error among answers)")
        ax_ooc.set_ylabel("out-of-catalog photos given a species")
        for a in (ax, ax_ooc):
            a.set_xlabel("coverage (in-catalog photos answered)")
            a.set_xlim(0, 1)
            a.set_ylim(0, 1)
            a.grid(alpha=0.3)
            a.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: Path, runs: Sequence[SettingRun], resamples: int, meta: dict) -> dict:
    """``results.json``, ``table.md`` and ``risk_coverage.png`` under ``out``."""
    out = Path(out)
    pooled = {}
    for gen in dict.fromkeys(r.generator for r in runs):
        pooled[gen] = compare([r for r in runs if r.generator == gen], resamples)
    settings = [{"generator": r.generator, "seed": r.seed, **r.info,
                 **compare([r], resamples)} for r in runs]
    results = {
        "synthetic": True,
        "what": "synthetic embeddings from the seeds' real class structure; not photos",
        "bootstrap": {"resamples": resamples, "level": 0.95,
                      "interval": "bias-corrected percentile",
                      "unit": "test photos, resampled with replacement within each data set; "
                              "the same resamples for every method (paired differences)"},
        "definitions": {
            "coverage": "share of in-catalog test photos given a species answer",
            "accuracy": "right species answers / species answers (in-catalog photos)",
            "accuracy_rare": f"the same over photos labelled with a rare species: not among "
                             f"the {COMMON_N} most frequent training species",
            "ece": "15-bin ECE of the answered in-catalog photos",
            "aurc": "area under the risk-coverage curve (best guess, one cut on the "
                    "confidence), in-catalog photos",
            "rank_answer_rate": "share of in-catalog photos given a rank (genus...class) "
                                "answer instead of a species",
            "rank_precision": "share of those rank answers whose taxon holds the label",
            "ooc_species_answer_rate": "share of photos of species the catalog lacks that "
                                       "got a species answer (always wrong)",
            "ooc_rank_answer_rate": "share of those photos given a rank answer",
            "ooc_rank_precision": "share of those rank answers whose taxon holds the species",
        },
        "methods": METHOD_LABELS, **meta, "pooled_over_seeds": pooled, "settings": settings,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False,
                                                 default=_json_default), "utf-8")
    text = table(pooled)
    families = family_table(runs)
    if families:
        text += "\n\nOut-of-fold decision families (recorded by train):\n" + families
    (out / "table.md").write_text(text + "\n", "utf-8")
    plot(out / "risk_coverage.png", runs)
    return results


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def pooled_figures(results: dict) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{generator: {method: {figure: [point, lower, upper]}}} from ``results.json``."""
    return {g: r["methods"] for g, r in results["pooled_over_seeds"].items()}

