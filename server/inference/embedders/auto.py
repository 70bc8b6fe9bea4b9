"""``auto``: the fastest runtime/precision that passes the fidelity gate here.

Which runtime is fastest depends on the CPU (bf16 units, AMX), so it is
measured on the machine itself at the first start and recorded in the data
dir with the CPU it was measured on; later starts reuse the record.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from biolit_id.index.core.atomic import atomic_write
from biolit_id.server.inference.embedders.base import (
    PRECISIONS,
    RUNTIMES,
    Embedder,
    RuntimeUnavailableError,
)
from biolit_id.server.inference.embedders.calibration import calibration_pixels, calibration_tag
from biolit_id.server.inference.embedders.export import artifact_root
from biolit_id.server.inference.embedders.factory import make_embedder
from biolit_id.server.inference.embedders.gate import (
    GATE_COSINE,
    Fidelity,
    fidelity_gate,
    reference_embeddings,
)
from biolit_id.server.inference.embedders.hardware import (
    cpu_has_amx_int8,
    cpu_has_bf16,
    cpu_identity,
)
from biolit_id.server.inference.model_loader import LoadedModel

log = logging.getLogger(__name__)

SCORE = "mean ms/photo at batch 1 and at the service's batch"  # what a record ranked by

# The runtimes `auto` considers (ties go to the earlier one, so a throughput
# mode is kept only when it is strictly faster than latency mode). int8 is
# chosen implicitly only on CPUs with AMX int8, and then only through the same
# gate; elsewhere it needs an explicit --precision int8 (and `biolit-id
# check-runtime` on the real model and real photos).
AUTO_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("openvino", "int8"),
    ("openvino-throughput", "int8"),
    ("onnx", "int8"),
    ("openvino", "bf16"),
    ("openvino-throughput", "bf16"),
    ("openvino", "fp32"),
    ("openvino-throughput", "fp32"),
    ("onnx", "fp32"),
    ("torch", "bf16"),
    ("torch", "fp32"),
)


@dataclass
class AutoChoice:
    """What ``auto`` picked and why: gates and measured speed of every candidate."""

    runtime: str
    precision: str
    gates: list[Fidelity]
    ms_per_photo: dict[str, float]  # "runtime precision" -> service_cost, this machine
    reused: bool = False  # read from the data dir's record instead of measured now
    batch: int = 8  # photos per timed forward: the service's batch size


def eligible_candidates(runtime: str, precision: str,
              candidates: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for cand_runtime, cand_precision in candidates:
        if runtime not in ("auto", cand_runtime) or precision not in ("auto", cand_precision):
            continue
        if cand_precision == "int8" and precision != "int8" and not cpu_has_amx_int8():
            continue  # opt-in without AMX: modest gain, and its gate needs real photos
        if cand_precision == "bf16" and not cpu_has_bf16():
            log.info("auto: skipping %s bf16 (no native bf16 on this CPU)", cand_runtime)
            continue
        out.append((cand_runtime, cand_precision))
    return out


def time_forward(embedders: Sequence[Embedder], pixels: np.ndarray, rounds: int = 3
                 ) -> list[float]:
    """Median ms per photo of each embedder on ``pixels``, measured interleaved.

    Rounds alternate between candidates so that a load spike from another
    process on a shared machine hits all of them, not just one.
    """
    for embedder in embedders:  # warm-up: first calls allocate and compile
        embedder.embed(pixels)
    samples: list[list[float]] = [[] for _ in embedders]
    for _ in range(rounds):
        for i, embedder in enumerate(embedders):
            started = time.perf_counter()
            embedder.embed(pixels)
            samples[i].append((time.perf_counter() - started) * 1e3 / len(pixels))
    return [float(np.median(s)) for s in samples]


def service_cost(embedders: Sequence[Embedder], batch: np.ndarray) -> list[float]:
    """Mean ms per photo alone and in ``batch``: an idle service runs photos one at a
    time and a busy one in batches, so a mode that pays off only on full batches
    (OpenVINO's throughput hint) must not win on batches alone."""
    alone = time_forward(embedders, batch[:1])
    batched = time_forward(embedders, batch)
    return [(a + b) / 2 for a, b in zip(alone, batched, strict=True)]


def resolve_auto(loaded: LoadedModel, runtime: str, precision: str,
                 cache_dir: str | Path | None, calibration_dir: Path | None = None,
                 candidates: Sequence[tuple[str, str]] = AUTO_CANDIDATES,
                 threshold: float = GATE_COSINE, batch: int = 8,
                 ) -> tuple[Embedder, AutoChoice]:
    """The fastest runtime/precision that passes the fidelity gate on this machine.

    ``auto`` in either field leaves that field free. Candidates needing a
    missing package or CPU feature are skipped; the others are exported,
    gated against torch fp32 on the calibration set, and the passing ones
    scored by ``service_cost`` (per photo alone and in batches of ``batch``,
    the service's batch size).
    """
    eligible = eligible_candidates(runtime, precision, candidates)
    tag = calibration_tag(calibration_dir)
    name = f"auto-{runtime}-{precision}-{tag}-b{batch}.json"
    record = artifact_root(loaded, cache_dir) / name
    cpu = cpu_identity()
    choice = _read_choice(record, cpu, threshold, eligible)
    if choice is not None:
        try:
            return make_embedder(loaded, choice.runtime, choice.precision, cache_dir,
                                 calibration_dir), choice
        except RuntimeUnavailableError as exc:  # a package went away since
            log.warning("auto: recorded choice unusable (%s); choosing again", exc)

    passing: list[tuple[Embedder, Fidelity | None]] = []
    gates: list[Fidelity] = []
    pixels = calibration_pixels(loaded, calibration_dir)
    reference = None
    for cand_runtime, cand_precision in eligible:
        try:
            embedder = make_embedder(loaded, cand_runtime, cand_precision, cache_dir,
                                     calibration_dir)
        except RuntimeUnavailableError as exc:
            log.info("auto: skipping %s %s: %s", cand_runtime, cand_precision, exc)
            continue
        if (cand_runtime, cand_precision) == ("torch", "fp32"):
            passing.append((embedder, None))  # the reference itself
            continue
        if reference is None:
            reference = reference_embeddings(loaded, pixels)
        gate = fidelity_gate(loaded, embedder, cache_dir, calibration_dir, reference, threshold)
        gates.append(gate)
        if gate.passed:
            passing.append((embedder, gate))
        else:
            log.warning("auto: %s %s fails the fidelity gate (min cosine %.5f < %.4f)",
                        cand_runtime, cand_precision, gate.cosine_min, threshold)
    if not passing:
        if precision == "int8":
            raise RuntimeUnavailableError(
                "no int8 runtime is available here or none passes the fidelity gate; "
                "install biolit-id[openvino] or biolit-id[onnx], or use --precision auto"
            )
        fallback = ("torch" if runtime == "auto" else runtime,
                    "fp32" if precision == "auto" else precision)
        log.warning("auto: nothing passes the gate; using %s %s", *fallback)
        return make_embedder(loaded, *fallback, cache_dir, calibration_dir), AutoChoice(
            fallback[0], fallback[1], gates, {}, batch=batch)
    sample = np.concatenate([pixels] * (batch // len(pixels) + 1))[:batch]
    timings = (service_cost([e for e, _ in passing], sample) if len(passing) > 1
               else [float("nan")])
    best = int(np.nanargmin(timings)) if len(passing) > 1 else 0
    chosen = passing[best][0]
    choice = AutoChoice(chosen.runtime, chosen.precision, gates,
                        {f"{e.runtime} {e.precision}": t
                         for (e, _), t in zip(passing, timings, strict=True)}, batch=batch)
    _write_choice(record, choice, cpu, threshold, eligible)
    if chosen.precision == "int8" and precision != "int8" and calibration_dir is None:
        log.warning("auto: picked int8 (AMX) gated on synthetic photos; check it on real "
                    "ones with biolit-id check-runtime, or pass --calibration-dir")
    log.info("auto: %s %s is the fastest passing the fidelity gate here (mean of batch 1 "
             "and batch %d: %s)",
             chosen.runtime, chosen.precision, batch,
             ", ".join(f"{k}: {v:.1f} ms/photo" for k, v in choice.ms_per_photo.items()))
    return chosen, choice


def _read_choice(record: Path, cpu: str, threshold: float,
                 eligible: list[tuple[str, str]]) -> AutoChoice | None:
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text("utf-8"))
        if (data["cpu"] != cpu or data["threshold"] != threshold
                or data.get("score") != SCORE
                or [tuple(c) for c in data["eligible"]] != eligible):
            return None
        return AutoChoice(data["runtime"], data["precision"],
                          [Fidelity(**g) for g in data["gates"]], data["ms_per_photo"],
                          reused=True, batch=int(data.get("batch", 8)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_choice(record: Path, choice: AutoChoice, cpu: str, threshold: float,
                  eligible: list[tuple[str, str]]) -> None:
    data = {"runtime": choice.runtime, "precision": choice.precision, "cpu": cpu,
            "threshold": threshold, "eligible": eligible,
            "gates": [asdict(g) for g in choice.gates], "ms_per_photo": choice.ms_per_photo,
            "batch": choice.batch, "score": SCORE,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(record, json.dumps(data, indent=2))


def build_embedder(loaded: LoadedModel, runtime: str, precision: str,
                   cache_dir: str | Path | None,
                   calibration_dir: Path | None = None, batch: int = 8) -> Embedder:
    """What the service calls: an explicit choice, or ``auto`` resolved by the gate."""
    if runtime not in ("auto", *RUNTIMES):
        raise RuntimeUnavailableError(
            f"unknown runtime {runtime!r}; choose auto or one of {', '.join(RUNTIMES)}")
    if precision not in ("auto", *PRECISIONS):
        raise RuntimeUnavailableError(
            f"unknown precision {precision!r}; choose auto or one of {', '.join(PRECISIONS)}")
    if runtime == "auto" or precision == "auto":
        embedder, _ = resolve_auto(loaded, runtime, precision, cache_dir, calibration_dir,
                                   batch=batch)
        return embedder
    if runtime == "torch" and precision == "int8":
        raise RuntimeUnavailableError(
            "the torch runtime has no int8 path; use --runtime onnx --precision int8 or "
            "--runtime openvino --precision int8 (and check it with biolit-id check-runtime)"
        )
    return make_embedder(loaded, runtime, precision, cache_dir, calibration_dir)
