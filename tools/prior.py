"""``biolit-id prior``: fit the place-and-season prior and the observation combiner.

* ``prior fit --occurrences FILE`` reads occurrence records in Darwin Core
  columns (``scientificName``, ``decimalLatitude``, ``decimalLongitude``,
  ``eventDate``; CSV, GBIF's tab-separated download, or Parquet), picks the
  spatial and seasonal bandwidths by held-out log-likelihood and writes
  ``prior.npz``/``prior.json`` into ``BUNDLE/prior/`` (``--bundle``),
  ``DATA_DIR/prior/`` (``--data-dir``) or ``--out``. With ``--observations``
  it then runs ``calibrate``.
* ``prior calibrate --bundle B --observations VAL`` fits the combiner (photo
  correlation, outlier rate, pooled exponent) and the prior's weight and floor
  on validation observations (``tools/training/observation_data.py`` layout) and writes
  ``combiner.json`` beside the prior.
* ``prior synth --out DIR`` writes a SYNTHETIC world to try all of this on.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from biolit_id.cli.training.datasets import DatasetError
from biolit_id.cli.training.prior_fit import (
    OccurrenceError,
    clean_records,
    fit_prior,
    read_occurrences,
)
from biolit_id.server.decision.bundle import BundleError
from biolit_id.server.decision.prior import (
    PRIOR_DIR,
    PRIOR_JSON,
    load_prior,
)

log = logging.getLogger(__name__)
def prior_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "out", None):
        return Path(args.out)
    if getattr(args, "bundle", None):
        return Path(args.bundle) / PRIOR_DIR
    if getattr(args, "data_dir", None):
        return Path(args.data_dir) / PRIOR_DIR
    raise SystemExit("say where the prior goes: --bundle, --data-dir or --out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="prior_command", metavar="ACTION", required=True)
    fit = sub.add_parser("fit", help="fit the prior from occurrence records")
    fit.add_argument("--occurrences", type=Path, required=True,
                     help="Darwin Core CSV/TSV or Parquet (GBIF download, BioLit export)")
    _where(fit)
    fit.add_argument("--bandwidth-km", type=float, default=None,
                     help="spatial kernel std (default: chosen by held-out likelihood)")
    fit.add_argument("--season-days", type=float, default=None,
                     help="seasonal kernel std in days (default: chosen likewise)")
    fit.add_argument("--max-records", type=int, default=2000, help="per species")
    fit.add_argument("--observations", type=Path, default=None,
                     help="validation observations: also fit the combiner (needs --bundle)")
    cal = sub.add_parser("calibrate", help="fit the combiner and prior weight on validation")
    cal.add_argument("--observations", type=Path, required=True)
    _where(cal)
    cal.add_argument("--answer", type=float, default=None,
                     help="cut on the observation answer's probability (default: keep, 0.5)")
    syn = sub.add_parser("synth", help="write a SYNTHETIC world (bundle, records, observations)")
    syn.add_argument("--out", type=Path, required=True)
    syn.add_argument("--correlated", action="store_true",
                     help="photos of one observation share an offset (half the spread)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--dim", type=int, default=512)


def _where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None,
                        help="bundle: the prior goes to BUNDLE/prior/")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="or the service's data directory: DATA_DIR/prior/")
    parser.add_argument("--out", type=Path, default=None, help="or this folder")
    parser.add_argument("--catalog", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    try:
        if args.prior_command == "synth":
            return _synth(args)
        if args.prior_command == "fit":
            code = _fit(args)
            if code or args.observations is None:
                return code
        return _calibrate(args)
    except (OccurrenceError, DatasetError, BundleError) as exc:
        log.error("%s", exc)
        return 2


def _known_names(args: argparse.Namespace) -> list[str]:
    from biolit_id.server.catalog.catalog import Catalog
    from biolit_id.server.decision.bundle import load_bundle

    catalog = Catalog.load(args.catalog) if args.catalog else Catalog.load_default()
    known = list(catalog.names())
    if args.bundle is not None:
        known += list(load_bundle(args.bundle).species)
    return known


def _fit(args: argparse.Namespace) -> int:
    import hashlib

    frame = read_occurrences(args.occurrences)
    names, lat, lon, day, report = clean_records(frame, _known_names(args))
    if not names:
        raise OccurrenceError(f"{args.occurrences}: no usable record")
    digest = hashlib.sha256(Path(args.occurrences).read_bytes()).hexdigest()[:16]
    prior = fit_prior(names, lat, lon, day, args.bandwidth_km, args.season_days,
                      args.max_records, meta={"source": str(args.occurrences),
                                              "source_sha256": digest, "records": report})
    out = prior.save(prior_dir(args))
    chosen = prior.meta["bandwidth_selection"]
    print(f"prior {prior.version}: {len(prior.species)} species, {report['used']} records "
          f"({report['dropped_bad_coordinates_or_name']} dropped, {report['without_date']} "
          f"without date); bandwidths per species, overall {chosen['overall_bandwidth_km']:g} km"
          f" and {chosen['overall_season_days']:g} days -> {out}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from biolit_id.cli.training.observation_data import read_observations
    from biolit_id.cli.training.observation_fit import fit_combiner, score_observations
    from biolit_id.server.decision.bundle import load_bundle
    from biolit_id.server.decision.observations import CombinerParams

    if args.bundle is None:
        raise SystemExit("calibrate scores the photos with a bundle: pass --bundle")
    bundle = load_bundle(args.bundle)
    data = read_observations(args.observations)
    data_fp = data.meta.get("model_fingerprint")
    if data_fp and data_fp != bundle.model_fingerprint:
        raise DatasetError(f"{args.observations}: embeddings made by model {data_fp}, "
                           f"the bundle's is {bundle.model_fingerprint}")
    folder = prior_dir(args)
    prior = load_prior(folder) if (folder / PRIOR_JSON).is_file() else None
    base = CombinerParams.load(folder)
    if getattr(args, "answer", None) is not None:
        base = base.replace(answer=args.answer)
    scored = score_observations(bundle, data, prior)
    params = fit_combiner(scored, base)
    path = params.save(folder)
    print(f"combiner fitted on {len(data)} observations -> {path}")
    for key in ("rho", "outlier", "pooled_gamma", "prior_weight", "prior_floor", "answer"):
        print(f"  {key:14s} {getattr(params, key):g}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from biolit_id.cli.training.synthetic_observations import write_world

    paths = write_world(args.out, dim=args.dim, seed=args.seed, correlated=args.correlated)
    print("SYNTHETIC world written:")
    for key, path in paths.items():
        print(f"  {key:12s} {path}")
    return 0
