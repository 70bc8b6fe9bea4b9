"""The service's ceiling: what its own measured parts allow on these cores.

Each stage of one photo's path is run alone and its *CPU* time measured
(``time.process_time``: every thread of the process, so a forward on two
threads counts two cores). The ceiling is cores / (sum of core-ms per photo);
the service's share is its measured photos/s at a concurrency divided by it.
The bench clients run in the server's process, so their gRPC cost is in both
the ceiling's "rpc" stage and the service's measurement.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from biolit_id.server.embedders.threads import available_cores
from biolit_id.server.preprocess import open_image, resize_for_model, to_array


def _cost(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median (core-ms, wall-ms) of ``fn`` over ``runs`` calls, after one warm-up."""
    fn()
    cpu, wall = [], []
    for _ in range(runs):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return statistics.median(cpu), statistics.median(wall)


def stage_costs(running, photos: Sequence[bytes], channel, batch: int, runs: int = 3) -> dict:
    """Core-ms and wall-ms per photo of each stage, measured one at a time."""
    state = running.state
    policy = state.identifier.policy
    photo = photos[0]
    wire = pb.IdentifyRequest(image=photo).SerializeToString()
    img = open_image(photo, policy)
    pixels = np.stack([to_array(resize_for_model(open_image(p, policy), policy), policy)
                       for p in (list(photos) * batch)[:batch]])
    emb = state.embedder.embed(pixels[:1])[0]
    stub = pb_grpc.SpeciesIdentifierStub(channel)
    by_embedding = pb.IdentifyRequest(embedding=emb.tolist())
    stages = {
        "parse": _cost(lambda: pb.IdentifyRequest.FromString(wire), runs * 10),
        "decode": _cost(lambda: open_image(photo, policy), runs),
        "resize": _cost(lambda: to_array(resize_for_model(img, policy), policy), runs * 5),
        # A whole batch, divided below: the batcher's batches amortise the same way.
        "model": _cost(lambda: state.embedder.embed(pixels), runs),
        # gRPC both ends (client in this process too), scoring and the response.
        "rpc_score_respond": _cost(lambda: stub.Identify(by_embedding), runs * 5),
    }
    out = {name: {"core_ms": c, "wall_ms": w} for name, (c, w) in stages.items()}
    out["model"] = {"core_ms": stages["model"][0] / batch, "wall_ms": stages["model"][1] / batch,
                    "cores_busy": stages["model"][0] / max(1e-9, stages["model"][1]),
                    "batch": batch}
    return out


def ceiling(stages: dict, cores: int | None = None) -> dict:
    """Photos/s the measured parts allow if every core were busy all the time."""
    n = cores or available_cores()
    per_photo = sum(s["core_ms"] for s in stages.values())
    return {"cores": n, "core_ms_per_photo": per_photo,
            "photos_per_s": n * 1e3 / per_photo if per_photo else float("nan")}


def bench_ceiling(running, photos: Sequence[bytes], channel, service: dict,
                  batch: int = 8) -> dict:
    """Stage costs, the ceiling, and the service's share of it at each concurrency."""
    stages = stage_costs(running, photos, channel, batch)
    top = ceiling(stages)
    shares = {c: summary["photos_per_s"] / top["photos_per_s"]
              for c, summary in service.get("concurrency", {}).items()}
    return {"stages": stages, **top, "share": shares}


def format_ceiling(label: str, result: dict) -> list[str]:
    """Report lines: one per stage, then the ceiling and shares."""
    lines = [f"ceiling for {label} ({result['cores']} cores):"]
    for name, s in result["stages"].items():
        lines.append(f"  {name:<18} {s['core_ms']:8.1f} core-ms  {s['wall_ms']:8.1f} ms wall")
    lines.append(f"  total {result['core_ms_per_photo']:.1f} core-ms/photo -> ceiling "
                 f"{result['photos_per_s']:.2f} photos/s; service share "
                 + ", ".join(f"c={c}: {v:.0%}" for c, v in result["share"].items()))
    return lines
