"""``biolit-id check-runtime``: is a faster runtime still the same model on YOUR photos?

int8's error depends on the real weights and photos, so it is picked
automatically only on AMX CPUs (and then gated on the calibration set, which
may be synthetic); whoever deploys it runs this first. Prints cosine to fp32 and
decision agreement; exit 0 when the gate passes, 1 when not, 2 on usage
errors. docs/performance.md ("The fidelity gate and auto").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from biolit_id.server.inference.embedders.base import PRECISIONS, RUNTIMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hf-hub:ORG/REPO or local-dir:PATH")
    parser.add_argument("--images", type=Path, required=True, help="folder of photos")
    parser.add_argument("--runtime", choices=RUNTIMES, default="openvino",
                        help="openvino-throughput: OpenVINO's throughput hint, batches split "
                             "over parallel streams (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="int8")
    parser.add_argument("--bundle", type=Path, help="trained bundle (hybrid decisions)")
    parser.add_argument("--data-dir", type=Path, default=Path("./data"),
                        help="where exported models are cached (default: %(default)s)")
    parser.add_argument("--calibration-dir", type=Path,
                        help="photos to calibrate OpenVINO int8 on (use others than --images)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many photos")
    parser.add_argument("--threshold", type=float, default=None,
                        help="minimum cosine to pass (default: the service's gate, 0.999)")
    parser.add_argument("--no-fast-decode", dest="fast_decode", action="store_false",
                        help="decode JPEGs at full size")
    parser.add_argument("--json", type=Path, help="also write the report here")


def decisions(scorer, protos, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """(routed species row or -1, method, nearest prototype) per photo."""
    scores = scorer.score(embeddings, protos, None)
    return (np.asarray(scores.routed.species), np.asarray(scores.routed.method),
            np.argmax(scores.p_proto, axis=1))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from biolit_id.server.catalog.catalog import Catalog
    from biolit_id.server.decision.bundle import BundleError, load_bundle
    from biolit_id.server.decision.seed_cascade import SeedCascadeScorer
    from biolit_id.server.decision.zero_shot import ZeroShotScorer
    from biolit_id.server.inference.embedders.auto import build_embedder
    from biolit_id.server.inference.embedders.base import RuntimeUnavailableError
    from biolit_id.server.inference.embedders.calibration import image_files
    from biolit_id.server.inference.embedders.gate import (
        GATE_COSINE,
        cosine_rows,
        embed_batched,
        reference_embeddings,
    )
    from biolit_id.server.inference.embedders.threads import configure_threads
    from biolit_id.server.inference.model_loader import ModelUnavailableError, load_model
    from biolit_id.server.inference.preprocess import ImageDecodeError, ImagePolicy, preprocess
    from biolit_id.server.inference.text_prototypes import TextPrototypeCache
    from biolit_id.server.wiring import initial_prototypes

    threshold = GATE_COSINE if args.threshold is None else args.threshold
    files = image_files(args.images, args.limit or None)
    if not files:
        print(f"check-runtime: no photos found in {args.images}", file=sys.stderr)
        return 2
    try:
        loaded = load_model(args.model)
        configure_threads()
        candidate = build_embedder(loaded, args.runtime, args.precision, args.data_dir,
                                   args.calibration_dir)
        bundle = (load_bundle(args.bundle, loaded.fingerprint, loaded.embedding_dim)
                  if args.bundle else None)
    except (ModelUnavailableError, RuntimeUnavailableError, BundleError, ValueError) as exc:
        print(f"check-runtime: {exc}", file=sys.stderr)
        return 2
    policy = ImagePolicy(image_size=loaded.image_size, mean=loaded.mean, std=loaded.std,
                         fast_decode=args.fast_decode)
    pixels, used = [], []
    for path in tqdm(files, desc="decode", unit="photo"):
        try:
            pixels.append(preprocess(path.read_bytes(), policy))
            used.append(path)
        except ImageDecodeError as exc:
            print(f"skipping {path.name}: {exc}", file=sys.stderr)
    if not pixels:
        print("check-runtime: no readable photos", file=sys.stderr)
        return 2
    batch = np.stack(pixels)
    reference = reference_embeddings(loaded, batch)
    embedded = embed_batched(candidate, batch)
    cos = cosine_rows(reference, embedded)

    scorer = SeedCascadeScorer(bundle) if bundle is not None else ZeroShotScorer()
    protos = initial_prototypes(Catalog.load_default(), scorer,
                                TextPrototypeCache(loaded, args.data_dir))
    ref_species, ref_method, ref_proto = decisions(scorer, protos, reference)
    new_species, new_method, new_proto = decisions(scorer, protos, embedded)
    same_decision = (ref_species == new_species) & (ref_method == new_method)
    worst = int(np.argmin(cos))
    report = {
        "model": args.model,
        "runtime": candidate.runtime,
        "precision": candidate.precision,
        "photos": len(used),
        "mode": scorer.mode,
        "cosine_min": float(cos.min()),
        "cosine_p1": float(np.percentile(cos, 1)),
        "cosine_mean": float(cos.mean()),
        "worst_photo": used[worst].name,
        "top1_decision_agreement": float(same_decision.mean()),
        "top1_prototype_agreement": float((ref_proto == new_proto).mean()),
        "threshold": threshold,
        "passed": bool(cos.min() >= threshold),
    }
    if hasattr(candidate, "streams"):  # OpenVINO: how many streams the mode compiled to
        report["streams"] = candidate.streams
    print(f"{candidate.runtime} {candidate.precision} vs torch fp32 on {len(used)} photos "
          f"({scorer.mode} mode)")
    print(f"  cosine: min {report['cosine_min']:.5f}  p1 {report['cosine_p1']:.5f}  "
          f"mean {report['cosine_mean']:.5f}  (worst: {report['worst_photo']})")
    print(f"  top-1 agreement: decision {report['top1_decision_agreement']:.1%}  "
          f"nearest prototype {report['top1_prototype_agreement']:.1%}")
    verdict = "PASS" if report["passed"] else "FAIL"
    print(f"  fidelity gate (min cosine >= {threshold}): {verdict}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), "utf-8")
    return 0 if report["passed"] else 1
