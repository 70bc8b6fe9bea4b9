"""The bench's ceiling: per-photo core costs summed and divided into the cores."""

from __future__ import annotations

import time

import pytest

from biolit_id.cli.bench.service import ceiling, with_cpu


def test_ceiling_is_cores_over_the_summed_core_cost() -> None:
    stages = {"decode": {"core_ms": 40.0}, "model": {"core_ms": 96.0},
              "rpc_score_respond": {"core_ms": 1.0}}
    top = ceiling(stages, cores=2)
    assert top["core_ms_per_photo"] == pytest.approx(137.0)
    assert top["photos_per_s"] == pytest.approx(2000 / 137)  # the 14.6 photos/s


def test_with_cpu_counts_busy_cores_not_sleep() -> None:
    def busy_then_idle() -> dict:
        end = time.process_time() + 0.05  # 50 ms of CPU, however loaded the machine
        while time.process_time() < end:
            pass
        time.sleep(0.05)
        return {"photos": 2}

    out = with_cpu(busy_then_idle)
    assert 24 <= out["core_ms_per_photo"] <= 40  # 50 core-ms over 2 photos
    assert 0 < out["cores_busy"] <= 0.6  # the 50 ms asleep count as wall, not as CPU
