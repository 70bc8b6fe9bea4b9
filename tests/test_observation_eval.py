"""``prior fit`` + ``prior calibrate`` + ``evaluate --observations`` on a small SYNTHETIC world.

Small sets (a few hundred observations), so the bounds here are loose; the
measured numbers on the full synthetic sets are in docs/observations.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from biolit_id.cli.main import main
from biolit_id.cli.training.observation_data import read_observations
from biolit_id.cli.training.synthetic_observations import write_world
from biolit_id.server.decision.observations import CombinerParams


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> dict[str, Path]:
    return write_world(tmp_path_factory.mktemp("world"), dim=256, seed=3, val=600, test=600,
                       special=300)


def test_synthetic_files_say_what_they_are(small_world) -> None:
    data = read_observations(small_world["validation"])
    assert data.meta["synthetic"] is True
    counts = data.counts
    assert counts.min() == 1 and counts.max() == 5
    assert 0 < (~data.on_target).sum() < 0.15 * len(data.owner)
    assert data.first_photos().sum() == len(data)
    assert data.on_target[data.first_photos()].all()  # the first photo is the find
    test = read_observations(small_world["test"])
    assert set(test.columns["set"]) == {"mixed", "three", "two_plus_one"}
    assert set(test.columns["role"]) == {"range", "season", "cooccurring", "distinct"}


def test_fit_calibrate_and_evaluate(small_world, tmp_path: Path, capsys) -> None:
    bundle = small_world["bundle"]
    assert main(["prior", "fit", "--occurrences", str(small_world["occurrences"]),
                 "--bundle", str(bundle), "--observations", str(small_world["validation"])]) == 0
    params = CombinerParams.load(bundle / "prior")
    assert params.fitted["multi_photo"] > 100
    assert params.fitted["nll_with_prior"] < params.fitted["nll_photos_only"]
    assert params.prior_weight > 0
    out = tmp_path / "report"
    assert main(["evaluate", "--bundle", str(bundle), "--observations",
                 str(small_world["test"]), "--out", str(out)]) == 0
    assert "[SYNTHETIC]" in capsys.readouterr().out
    metrics = json.loads((out / "observations.json").read_text())
    overall = metrics["overall"]
    assert set(overall) >= {"one_photo", "all_photos", "all_photos_place_date", "pooled",
                            "on_target_photos"}
    for m in overall.values():
        assert 0 <= m["accuracy_all"] <= m["coverage"] <= 1
    found = metrics["targets"]
    assert found["three_photos_vs_first_points"] >= 10
    assert found["place_date_gain_range_points"] >= 5
    assert found["place_date_gain_cooccurring_points"] >= -3
    assert found["ece_observation_answers"] <= 0.08
    assert metrics["prior_version"] and metrics["synthetic"]
    # An observations file that cannot be read: exit code 2, as for photos.
    assert main(["evaluate", "--bundle", str(bundle), "--observations",
                 str(tmp_path / "missing.parquet"), "--out", str(out)]) == 2
