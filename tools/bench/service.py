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

import grpc
import numpy as np

from biolit_id.cli.bench.common import client_channel
from biolit_id.cli.bench.rpc import closed_loop
from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from biolit_id.server.inference.embedders.threads import available_cores
from biolit_id.server.inference.preprocess import open_image, resize_for_model, to_array


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


def _refused(stub, request: pb.IdentifyRequest) -> None:
    try:
        stub.Identify(request)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise


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
    def refused(size: int) -> Callable[[], object]:
        # Non-image bytes: refused right after the header check, so the call costs the
        # transfer of ``size`` bytes and the gRPC path, nothing else.
        request = pb.IdentifyRequest(image=b"\0" * size)
        return lambda: _refused(stub, request)

    big, small = _cost(refused(len(photo)), runs * 3), _cost(refused(16), runs * 3)
    stages = {
        # Bytes of a photo over loopback gRPC (both ends), beyond a tiny request's cost.
        "receive": (max(0.0, big[0] - small[0]), max(0.0, big[1] - small[1])),
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


def with_cpu(run: Callable[[], dict]) -> dict:
    """``run()``'s result plus the process's core-ms per photo and cores busy during it.

    On a shared machine the wall-clock share understates the service when
    other jobs take its cores; ``cpu_efficiency`` (stage core-ms / service
    core-ms) does not depend on that: below 1 is CPU the service wastes.
    """
    c0, w0 = time.process_time(), time.perf_counter()
    result = run()
    cpu, wall = (time.process_time() - c0) * 1e3, (time.perf_counter() - w0) * 1e3
    photos = max(1, result.get("photos", 0))
    return {**result, "core_ms_per_photo": cpu / photos, "cores_busy": cpu / max(1e-9, wall)}


def bench_ceiling(running, photos: Sequence[bytes], channel,
                  loop: Callable[[int], dict], concurrency: int = 4, batch: int = 8) -> dict:
    """Stage costs, the ceiling, and the service's share of it at ``concurrency``.

    ``loop(c)`` runs the closed-loop clients at concurrency ``c`` (bench.py's).
    """
    loop(1)  # warm-up: connections, first batches
    service = with_cpu(lambda: loop(concurrency))
    stages = stage_costs(running, photos, channel, batch)
    top = ceiling(stages)
    return {"stages": stages, **top, "concurrency": concurrency,
            "service_photos_per_s": service["photos_per_s"],
            "service_p50_ms": service["p50_ms"],
            "service_core_ms_per_photo": service["core_ms_per_photo"],
            "service_cores_busy": service["cores_busy"],
            "share": service["photos_per_s"] / top["photos_per_s"],
            "cpu_efficiency": top["core_ms_per_photo"] / service["core_ms_per_photo"]}


def service_ceiling(running, photos: Sequence[bytes], per_client: int,
                    concurrency: int = 4) -> dict:
    """``bench_ceiling`` over a fresh channel with bench_rpc's closed-loop clients."""
    photos = list(photos)
    return bench_ceiling(
        running, photos, client_channel(running.port),
        lambda c: closed_loop(running.port, photos, c, max(per_client * c, 2 * c)),
        concurrency)


def report_lines(results: dict) -> list[str]:
    """Ceiling lines for every service runtime in a results file, and the upload check."""
    lines = []
    for svc in results.get("service", []):
        if "ceiling" in svc:
            lines += format_ceiling(f"{svc['runtime']} {svc['precision']}", svc["ceiling"])
    up = results.get("upload")
    if up:
        lines.append(
            f"upload downsized to {up['short_side']} px: same decision {up['same_decision']:.0%} "
            f"of {up['photos']} photos, cosine min {up['cosine_min']:.5f}, "
            f"{up['bytes_original_mean'] / 1e3:.0f} -> {up['bytes_downsized_mean'] / 1e3:.0f} kB")
    return lines


def format_ceiling(label: str, result: dict) -> list[str]:
    """Report lines: one per stage, then the ceiling and the service's share."""
    lines = [f"ceiling for {label} ({result['cores']} cores):"]
    for name, s in result["stages"].items():
        lines.append(f"  {name:<18} {s['core_ms']:8.1f} core-ms  {s['wall_ms']:8.1f} ms wall")
    lines.append(
        f"  total {result['core_ms_per_photo']:.1f} core-ms/photo -> ceiling "
        f"{result['photos_per_s']:.2f} photos/s; service at c={result['concurrency']} "
        f"{result['service_photos_per_s']:.2f} photos/s = {result['share']:.0%} of it "
        f"({result['service_core_ms_per_photo']:.1f} core-ms/photo, "
        f"{result['service_cores_busy']:.2f} cores busy, CPU efficiency "
        f"{result['cpu_efficiency']:.0%})")
    return lines
