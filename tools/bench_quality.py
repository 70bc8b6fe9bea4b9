"""``biolit-id bench-quality``: our decision against the seed's method and simple baselines.

On realistic synthetic long tails (``evaluation.quality_bench``): the second
generation's ``longtail_realistic.py`` at difficulties 1.0 and 1.2, and the
first generation's ``realistic_v4``, for several seeds. Per data set it runs
``train`` -> ``calibrate`` -> ``evaluate`` with their defaults, every other
family the bundle could serve (calibrated alike), the seed's method re-trained
on the same split, class-mean cosine, shrinkage LDA and exemplar kNN, and
reports every figure with a bootstrap 95 % interval (test photos resampled).
Synthetic embeddings, not photos.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from biolit_id.cli.evaluation.quality_bench import (
    DEFAULT_V2_SCRIPT,
    GENERATORS,
    run_setting,
    table,
    write_results,
)
from biolit_id.server.catalog.catalog import Catalog

log = logging.getLogger(__name__)

DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_RESAMPLES = 1000
QUICK_RESAMPLES = 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--generators", nargs="+", default=[g.name for g in GENERATORS],
                        choices=[g.name for g in GENERATORS],
                        help="benchmark families (default: all)")
    parser.add_argument("--v2-generator", type=Path, default=DEFAULT_V2_SCRIPT,
                        help="longtail_realistic.py (default: ../shared/benchmarks/ from the "
                             "repository root)")
    parser.add_argument("--model", default=None,
                        help="512-d model spec for the v4 data's text prompts (default: a demo "
                             "model under OUT)")
    parser.add_argument("--model-v2", default=None,
                        help="768-d model spec for the v2 data (default: a demo model under OUT)")
    parser.add_argument("--resamples", type=int, default=None,
                        help=f"bootstrap resamples (default {DEFAULT_RESAMPLES}, "
                             f"--quick {QUICK_RESAMPLES})")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the data sets under OUT whose commands all ran; run the rest")
    parser.add_argument("--quick", action="store_true",
                        help="one seed, v2 at difficulty 1.0 and v4, few photos, a short head "
                             "training: for tests, not for numbers")


def run(args: argparse.Namespace) -> int:
    from biolit_id.cli.demo_model import write_demo_model

    names = ["v2-d1.0", "v4"] if args.quick else args.generators
    if any(n.startswith("v2") for n in names) and not Path(args.v2_generator).is_file():
        log.error("%s: no realistic benchmark generator there (--v2-generator)",
                  args.v2_generator)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds[:1] if args.quick else args.seeds
    chosen = [g for g in GENERATORS if g.name in names]
    resamples = args.resamples or (QUICK_RESAMPLES if args.quick else DEFAULT_RESAMPLES)
    models = {512: args.model, 768: args.model_v2}
    for dim in {g.dim for g in chosen}:
        if models[dim] is None:
            models[dim] = f"local-dir:{write_demo_model(out / f'demo-model-{dim}', embed_dim=dim)}"
    catalog = Catalog.load_default()
    t0 = time.monotonic()
    runs = []
    for generator in chosen:
        for seed in seeds:
            where = out / generator.name / f"seed{seed}"
            log.info("SYNTHETIC %s seed %d -> %s", generator.name, seed, where)
            runs.append(run_setting(generator, seed, where, models[generator.dim], catalog,
                                    args.v2_generator, args.quick, args.resume))
            log.info("  %s seed %d done in %.0f s", generator.name, seed,
                     runs[-1].info["seconds"])
            if not args.quick:  # a long run keeps what it has measured so far
                write_results(out, runs, resamples, _meta(args, seeds, chosen, models, t0, True))
    results = write_results(out, runs, resamples, _meta(args, seeds, chosen, models, t0, False))
    print(table(results["pooled_over_seeds"]))
    print(f"\n{out / 'results.json'}, {out / 'table.md'}, {out / 'risk_coverage.png'} "
          f"({results['runtime_s']:.0f} s)")
    return 0


def _meta(args: argparse.Namespace, seeds: list[int], chosen: list, models: dict,
          t0: float, partial: bool) -> dict:
    return {"seeds": seeds, "generators": [g.name for g in chosen], "quick": args.quick,
            "partial": partial, "models": {str(k): v for k, v in models.items()},
            "v2_generator": str(args.v2_generator), "runtime_s": time.monotonic() - t0}
