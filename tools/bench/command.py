"""``biolit-id bench``: the seed's path vs the service, runtimes, and the gallery at scale.

Speed is judged here, on one machine and the same photos side by side, never
in unit tests. This module is the command line; the sections measure in
``bench_model`` (decode, seed, forward), ``bench_rpc`` (service, adds) and
``bench_gallery`` (gallery, start), and ``bench_report`` prints the table.
Sections, how to run them, and the measured results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from biolit_id.cli.bench.common import machine, parse_pairs, parse_size, start_bench_server
from biolit_id.cli.bench.embeddings import bench_embeddings
from biolit_id.cli.bench.embeddings import report_lines as embedding_lines
from biolit_id.cli.bench.gallery import bench_gallery_size, bench_start
from biolit_id.cli.bench.gallery_scale import BACKENDS, CHECKPOINTS, STREAM, bench_backend
from biolit_id.cli.bench.model import bench_decode, bench_forward, bench_seed_path
from biolit_id.cli.bench.models import run_models
from biolit_id.cli.bench.report import evaluate_targets, table
from biolit_id.cli.bench.rpc import auto_record, bench_adds, bench_service
from biolit_id.cli.bench.service import report_lines, service_ceiling
from biolit_id.cli.bench.soak import add_soak_arguments, run_soak
from biolit_id.cli.bench.upload import bench_upload
from biolit_id.server.config import ServerConfig
from biolit_id.server.inference.embedders.calibration import calibration_pixels, synthetic_photos
from biolit_id.server.inference.embedders.threads import configure_threads
from biolit_id.server.inference.model_loader import ModelUnavailableError, load_model

log = logging.getLogger(__name__)

SECTIONS = ("decode", "seed", "forward", "service", "upload", "adds", "embeddings", "gallery",
            "start",
            *(f"gallery-{b}" for b in BACKENDS))
DEFAULT_RUNTIMES = ("torch:fp32", "torch:bf16", "onnx:fp32", "onnx:int8", "openvino:fp32",
                    "openvino:bf16", "openvino:int8", "openvino-throughput:bf16",
                    "openvino-throughput:int8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local-dir:PATH or hf-hub:ORG/REPO "
                        "(time with `biolit-id demo-model DIR --arch ViT-B-16`)")
    parser.add_argument("--report", action="store_true",
                        help="only print the table of an existing --out file")
    parser.add_argument("--out", type=Path, default=Path("bench-results/bench-results.json"),
                        help="JSON results file (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=Path("bench-results/data"),
                        help="export cache and gallery for the runs (default: %(default)s)")
    parser.add_argument("--update", action="store_true",
                        help="keep the other sections already in --out (run sections apart)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: a smoke run in seconds (numbers meaningless)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma list of: " + ", ".join(SECTIONS))
    parser.add_argument("--photos", type=int, default=8, help="distinct photos per run")
    parser.add_argument("--photo-size", default="4000x3000",
                        help="synthetic JPEG size, WxH (default: a 12-Mpx phone photo)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--runtimes", default=",".join(DEFAULT_RUNTIMES),
                        help="forward section: runtime:precision list")
    parser.add_argument("--service-runtimes", default="auto:auto,openvino:int8",
                        help="service section: runtime:precision list (auto = the default)")
    parser.add_argument("--service-threads", default="0",
                        help="service section: model thread counts to compare (0 = one per "
                             "core); e.g. 0,1 to see decode/model contention on 2 cores")
    parser.add_argument("--service-decoders", default="0",
                        help="service section: --decode-threads values to compare (0 = one "
                             "per call); e.g. 0,1 to cap decoders beside the model")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--per-client", type=int, default=6,
                        help="photos per client per service run")
    parser.add_argument("--gallery-sizes", default="10000,100000,1000000")
    parser.add_argument("--gallery-dim", type=int, default=256,
                        help="vector size in the gallery (256: a bundle's whitened space)")
    parser.add_argument("--gallery-data", choices=("clustered", "uniform"), default="clustered")
    parser.add_argument("--queries", type=int, default=200, help="search queries per index")
    parser.add_argument("--adds", type=int, default=1000, help="adds through gRPC (stream)")
    parser.add_argument("--start-exemplars", type=int, default=1_000_000,
                        help="gallery size for the start-time measurement")
    parser.add_argument("--scale-checkpoints", default=",".join(map(str, CHECKPOINTS)),
                        help="gallery-<backend> sections: gallery sizes where a stream of adds "
                             "is timed (default: %(default)s)")
    parser.add_argument("--scale-stream", type=int, default=STREAM,
                        help="photos per AddExemplars-sized stream (default: %(default)s)")
    parser.add_argument("--scale-fill", choices=("bulk", "stream"), default="bulk",
                        help="how the gallery grows between checkpoints: the bulk add "
                             "(short runs) or streams all the way (default: %(default)s)")
    parser.add_argument("--scale-dim", type=int, default=512,
                        help="vector size of the gallery-<backend> sections (512: zero-shot)")
    parser.add_argument("--models", action="store_true",
                        help="compare BioCLIP and BioCLIP-2 (demo weights): load, CPU per photo, "
                             "memory; writes bench-models.json beside --out")
    parser.add_argument("--models-runtimes", default="",
                        help="with --models, also time these runtime:precision pairs in wall "
                             "time, e.g. torch:fp32,openvino:fp32 (wants a quiet machine)")
    add_soak_arguments(parser)


def quick_settings(args: argparse.Namespace) -> None:
    args.photos = min(args.photos, 2)
    args.photo_size = "640x480"
    args.repeats = 1
    args.runtimes = "torch:fp32,onnx:fp32"
    args.service_runtimes = "torch:fp32"
    args.concurrency = "1,2"
    args.per_client = 2
    args.gallery_sizes = "2000"
    args.queries = 10
    args.adds = 10
    args.start_exemplars = 500
    args.scale_checkpoints = "0,300"
    args.scale_stream = 50


def run(args: argparse.Namespace) -> int:
    if args.soak:  # not a section: a long run with kills (tools/bench/soak.py)
        return run_soak(args)
    if args.models:  # not a section: two models of its own (tools/bench/models.py)
        return run_models(args)
    if args.report:
        results = json.loads(args.out.read_text("utf-8"))
        results["targets"] = evaluate_targets(results)
        print(table(results))
        return 0
    if not args.model:
        print("biolit-id bench: --model is required", file=sys.stderr)
        return 2
    if args.quick:
        quick_settings(args)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        print(f"biolit-id bench: unknown sections {sorted(unknown)}", file=sys.stderr)
        return 2
    try:
        loaded = load_model(args.model)
    except ModelUnavailableError as exc:
        print(f"biolit-id bench: {exc}", file=sys.stderr)
        return 1
    defaults = ServerConfig()
    threads = configure_threads(defaults.model_threads, defaults.search_threads)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    photos = synthetic_photos(args.photos, parse_size(args.photo_size), seed=11)
    small = synthetic_photos(args.photos, (640, 480), seed=12)
    results: dict = {}
    if args.update and args.out.is_file():
        results = json.loads(args.out.read_text("utf-8"))
    results |= {
        "machine": machine(), "threads": threads, "model": args.model,
        "model_fingerprint": loaded.fingerprint, "quick": bool(args.quick),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in {"func"}},
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results.setdefault("runs", []).append({"sections": sorted(sections),
                                           "machine": results["machine"],
                                           "started_at": results["started_at"]})

    def save() -> None:
        results["targets"] = evaluate_targets(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str), "utf-8")

    if "decode" in sections:
        results["decode"] = bench_decode(loaded, photos, args.repeats)
        save()
    if "seed" in sections:
        results["seed"] = bench_seed_path(loaded, photos, args.repeats)
        save()
    if "forward" in sections:
        pixels = calibration_pixels(loaded, None, count=8)
        results["forward"] = bench_forward(loaded, parse_pairs(args.runtimes), args.data_dir,
                                           pixels, args.repeats, batch=8,
                                           single_runs=max(3, 4 * args.repeats))
        save()
    if {"service", "adds", "upload", "embeddings"} & sections:
        results["service"] = []
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        configs = [(pair, int(t), int(d)) for pair in parse_pairs(args.service_runtimes)
                   for t in args.service_threads.split(",")
                   for d in args.service_decoders.split(",")]
        for i, ((runtime, precision), model_threads, decoders) in enumerate(configs):
            # One data dir for all: exports and the auto choice are made once.
            data_dir = args.data_dir / "service"
            shutil.rmtree(data_dir / "gallery", ignore_errors=True)
            running, start_s = start_bench_server(args.model, data_dir, runtime, precision,
                                                  model_threads=model_threads,
                                                  decode_threads=decoders)
            try:
                if "service" in sections:
                    svc = bench_service(running, start_s, photos, small, concurrencies,
                                        args.repeats, args.per_client,
                                        single_runs=max(5, 4 * args.repeats))
                    svc["requested"] = f"{runtime}:{precision}"
                    if "auto" in (runtime, precision):
                        svc["auto_choice"] = auto_record(running.state.model, data_dir,
                                                         runtime, precision)
                    svc["model_threads"] = running.state.config.model_threads or threads[
                        "model_threads"]
                    svc["decode_threads"] = decoders
                    svc["ceiling"] = service_ceiling(running, photos, args.per_client)
                    results["service"].append(svc)
                    save()
                if i == 0 and "upload" in sections:
                    results["upload"] = bench_upload(running, photos)
                    save()
                if i == 0 and "embeddings" in sections:  # device-made embeddings vs photos
                    results["embeddings"] = bench_embeddings(running, photos,
                                                             repeats=args.repeats)
                    save()
                if i == 0 and "adds" in sections:
                    results["adds"] = bench_adds(running, args.adds,
                                                 n_single=max(5, args.adds // 10))
                    save()
            finally:
                running.stop(1.0)
    if "gallery" in sections:
        results["gallery"] = []
        for n in (int(s) for s in args.gallery_sizes.split(",")):
            results["gallery"].append(bench_gallery_size(
                n, args.gallery_dim, args.queries, args.gallery_data,
                search_threads=threads["search_threads"]))
            save()
    for backend in BACKENDS:
        if f"gallery-{backend}" in sections:
            results.setdefault("gallery_backends", {})[backend] = bench_backend(
                backend, args.data_dir / f"scale-{backend}", dim=args.scale_dim,
                checkpoints=[int(c) for c in args.scale_checkpoints.split(",")],
                stream=args.scale_stream, fill=args.scale_fill, queries=args.queries,
                repeats=args.repeats)
            save()
    if "start" in sections:
        results["start"] = bench_start(args.model, args.data_dir / "start",
                                       args.start_exemplars)
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(table(results))
    print("\n".join(report_lines(results) + embedding_lines(results.get("embeddings"))))
    print(f"results written to {args.out}")
    return 0
