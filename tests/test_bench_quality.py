"""``biolit-id bench-quality --quick`` end to end, the bootstrap, and the v4 realistic generator.

The realistic v2 generator is read from ../shared/benchmarks/longtail_realistic.py
(the default path). Quick mode's numbers mean nothing (a few photos, a 3-epoch
head): these tests check the protocol and the report, not the method.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from biolit_id.cli.evaluation.bootstrap import bc_interval, bootstrap
from biolit_id.cli.evaluation.quality_bench import (
    DEFAULT_V2_SCRIPT,
    FAMILY_PREFIX,
    FIGURES,
    METHODS,
)
from biolit_id.cli.evaluation.realistic_v4 import RealisticSpec, generate, seed_structure
from biolit_id.cli.main import main
from biolit_id.cli.training.datasets import read_embeddings, read_table

MEAN_LIKE = ("coverage", "accuracy", "ooc_species_answer_rate", "rank_answer_rate")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    assert DEFAULT_V2_SCRIPT.is_file(), f"{DEFAULT_V2_SCRIPT} missing (../shared)"
    out = tmp_path_factory.mktemp("bench-quality")
    assert main(["bench-quality", "--out", str(out), "--quick"]) == 0
    return out, json.loads((out / "results.json").read_text("utf-8"))


def _blocks(results: dict):
    """(where, figures of one method) for every pooled and per-setting block."""
    for gen, res in results["pooled_over_seeds"].items():
        for m, figs in res["methods"].items():
            yield f"{gen}/{m}", figs, res
    for s in results["settings"]:
        for m, figs in s["methods"].items():
            yield f"{s['generator']}-seed{s['seed']}/{m}", figs, s


def test_every_figure_has_an_interval_around_it(quick):
    _, results = quick
    assert results["synthetic"] is True and results["quick"] is True
    assert results["partial"] is False
    assert results["generators"] == ["v2-d1.0", "v4"]
    assert results["bootstrap"]["resamples"] >= 100
    assert "test photos" in results["bootstrap"]["unit"]
    seen = 0
    for where, figs, block in _blocks(results):
        assert set(FIGURES) <= set(figs), where
        for name in FIGURES:
            point, lo, hi = figs[name]
            if not math.isfinite(point):
                assert name in ("accuracy", "accuracy_rare", "accuracy_common", "ece",
                                "rank_precision", "ooc_rank_precision"), (where, name)
                continue
            assert 0.0 <= lo <= point <= hi <= 1.0, (where, name, figs[name])
            seen += 1
        for name in MEAN_LIKE:  # the bias-corrected interval never needs widening for these
            assert f"{where.split('/')[1]}/{name}" not in block["widened"], (where, name)
    assert seen > 100


def test_all_methods_and_out_of_catalog_reported(quick):
    _, results = quick
    for gen, res in results["pooled_over_seeds"].items():
        families = {FAMILY_PREFIX + f for f in ("cosine", "cosine+prior", "head", "head+prior",
                                                "fused", "fused+prior", "lda", "cosine+lda")}
        assert set(res["methods"]) == set(METHODS) | families, gen
        assert res["photos"]["out_of_catalog"] > 0 and res["photos"]["rare"] > 0
        for m, figs in res["methods"].items():
            assert math.isfinite(figs["ooc_species_answer_rate"][0]), (gen, m)
            assert math.isfinite(figs["coverage"][0]), (gen, m)
        ours = res["methods"]["ours"]
        assert ours["coverage"][0] > 0.5  # calibrated to answer 0.88 of validation
        for m in METHODS[1:]:  # paired differences are differences of the points
            for fig in ("coverage", "accuracy", "ooc_species_answer_rate"):
                d = res["minus_ours"][m][fig][0]
                want = res["methods"][m][fig][0] - ours[fig][0]
                assert d == pytest.approx(want, abs=1e-12), (gen, m, fig)


def test_settings_are_what_a_user_runs(quick):
    out, results = quick
    for s in results["settings"]:
        fits = s["fits"]
        assert fits["ours"]["routing"] == "fused"
        assert fits["seed_method"]["routing"] == "seed"
        assert fits["ours"]["calibration"]["coverage"] >= 0.88 - 1e-9
        assert fits["cosine"]["cut"] > 0 and fits["lda"]["shrinkage"] in (0.1, 0.3, 0.6)
        assert fits["knn"]["k"] == 3 and fits["knn"]["cut"] > 0
        # Our figures agree with what `evaluate` wrote for the same bundle and photos:
        # its coverage counts every test photo, ours splits in-catalog and out-of-catalog.
        where = out / s["generator"] / f"seed{s['seed']}"
        metrics = json.loads((where / "report" / "metrics.json").read_text("utf-8"))
        test = read_embeddings(where / "data" / "test.parquet")
        inside = np.asarray(read_table(where / "data" / "test.parquet", ("in_catalog",),
                                       "test").column("in_catalog").to_pylist())
        assert metrics["samples"] == len(test) == len(inside)
        ours = s["methods"]["ours"]
        answered = (ours["coverage"][0] * inside.sum()
                    + ours["ooc_species_answer_rate"][0] * (~inside).sum())
        assert answered == pytest.approx(metrics["coverage"] * len(test), abs=1e-6)
        seed_cov = (s["methods"]["seed_method"]["coverage"][0] * inside.sum()
                    + s["methods"]["seed_method"]["ooc_species_answer_rate"][0] * (~inside).sum())
        assert seed_cov == pytest.approx(metrics["compare_seed"]["coverage"] * len(test),
                                         abs=1e-6)
    v4_methods = results["pooled_over_seeds"]["v4"]["methods"]
    assert (out / "table.md").read_text("utf-8").count("| v4 |") == len(v4_methods)
    for s in results["settings"]:  # the chosen family, recalibrated alike, is ours exactly
        chosen = s["fits"]["ours"]["decision_families"]["chosen"]
        assert s["methods"][FAMILY_PREFIX + chosen] == s["methods"]["ours"], chosen
    assert (out / "risk_coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_v2_generator_is_refused(tmp_path):
    assert main(["bench-quality", "--out", str(tmp_path), "--quick",
                 "--v2-generator", str(tmp_path / "nope.py")]) == 2


def test_bias_corrected_interval():
    rng = np.random.default_rng(0)
    x = rng.random(400) < 0.3

    def stat(draw):
        return {"rate": float(x[draw[0]].mean()), "none": float("nan")}

    values, widened = bootstrap(stat, [len(x)], resamples=300, seed=1)
    point, lo, hi = values["rate"]
    assert lo < point < hi and hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 400),
                                                          rel=0.3)
    assert math.isnan(values["none"][0]) and widened == []
    again = bootstrap(stat, [len(x)], resamples=300, seed=1)[0]
    assert again["rate"] == values["rate"]  # deterministic
    # A point below every replicate (ECE-like upward bias): the interval moves down to it.
    lo, hi = bc_interval(0.05, np.linspace(0.08, 0.12, 200))
    assert lo <= 0.05 <= hi


def test_realistic_v4_mechanisms(tmp_path):
    info = generate(tmp_path, RealisticSpec(seed=3, scale=0.3))
    names, protos, mu, w = seed_structure()
    splits = {s: read_embeddings(tmp_path / f"{s}.parquet") for s in ("train", "val", "test")}
    inside = np.asarray(read_table(tmp_path / "test.parquet", ("in_catalog",), "test")
                        .column("in_catalog").to_pylist())
    outside = {s for s, k in zip(splits["test"].species, inside, strict=True) if not k}
    assert len(outside) == info["outside_catalog_species"] == 7
    assert not outside & set(splits["train"].species) and not outside & set(splits["val"].species)
    assert splits["train"].dim == 512
    # Calibrated like the v2 generator: a test photo's whitened cosine to its own prototype
    # has a median near 0.3.
    index = {n: i for i, n in enumerate(names)}
    x = splits["test"].embeddings.astype(np.float64)
    z = (x - mu) @ w
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    y = np.array([index[s] for s in splits["test"].species])
    assert 0.2 < np.median((z * protos[y]).sum(1)) < 0.4
    # A flatter test prior: the most frequent training species is rarer in test.
    train_counts, test_counts = splits["train"].counts(), splits["test"].counts()
    top = max(train_counts, key=train_counts.get)
    share_train = train_counts[top] / len(splits["train"])
    assert test_counts.get(top, 0) / len(splits["test"]) < 0.6 * share_train
    taxonomy = json.loads((tmp_path / "taxonomy.json").read_text("utf-8"))
    assert set(taxonomy) == set(names) and all(t.get("genus") for t in taxonomy.values())
