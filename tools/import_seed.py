"""``biolit-id import-seed``: turn the BioLit seed's trained files into a bundle.

The seed (``docs/seed-v4.md``) ships torch pickles, and unpickling runs
whatever code a file names, so they are read with ``weights_only=True`` and a
minimal allow-list. Weights, thresholds and names are kept exactly; text
prototypes are remade from ``--model``. docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from biolit_id.cli.seedcompat import import_v2 as v2
from biolit_id.cli.seedcompat.formats import (
    SeedImportError,
)
from biolit_id.cli.seedcompat.import_v4 import import_seed
from biolit_id.cli.training.rank_thresholds import summary_line
from biolit_id.server.decision.bundle import Bundle
from biolit_id.server.inference.model_loader import DEFAULT_MODEL

log = logging.getLogger(__name__)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--v2", action="store_true",
                        help="the seed's second generation (BioCLIP-2, 215 species, rank heads): "
                             "--prototypes proto_model.npz --classifier mlp_model.pt "
                             "--taxonomy tax_lookup.pkl")
    parser.add_argument("--classifier", type=Path, required=True,
                        help="the seed's best_model_top50.pth (--v2: mlp_model.pt)")
    parser.add_argument("--prototypes", type=Path, required=True,
                        help="the seed's prototypes_v4.pt (--v2: proto_model.npz)")
    parser.add_argument("--taxonomy", type=Path, default=None,
                        help="--v2 only: the seed's tax_lookup.pkl")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model that will serve the bundle (v4: its text tower makes the "
                             f"text prototypes; default {DEFAULT_MODEL}; for --v2 use "
                             "hf-hub:imageomics/bioclip-2)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="CSV species,prompt replacing the catalog's prompts (v4 only)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="--v2 only: accept a level when its top-1 >= this (default 0.5; "
                             "the seed's production copy uses 0.35)")
    parser.add_argument("--margin", type=float, default=None,
                        help="--v2 only: ... and top-1 - top-2 >= this (default 0.10; "
                             "production 0.05)")


def _build(args: argparse.Namespace) -> tuple[Bundle, list[str]]:
    if args.v2:
        if args.taxonomy is None:
            raise SeedImportError("--v2 needs --taxonomy tax_lookup.pkl")
        if args.prompts is not None:
            raise SeedImportError("--prompts applies to the v4 seed only: v2 ships its "
                                  "fused prototypes")
        bundle = v2.import_seed_v2(
            args.prototypes, args.classifier, args.taxonomy, args.model,
            threshold=v2.DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
            margin=v2.DEFAULT_MARGIN if args.margin is None else args.margin)
        return bundle, v2.summary_lines(bundle)
    for flag in ("taxonomy", "threshold", "margin"):
        if getattr(args, flag) is not None:
            raise SeedImportError(f"--{flag} applies to --v2 only (the v4 seed's thresholds "
                                  "are in its prototypes file)")
    bundle = import_seed(args.classifier, args.prototypes, args.model, args.prompts)
    return bundle, summary_lines(bundle)


def run(args: argparse.Namespace) -> int:
    from biolit_id.server.inference.model_loader import ModelUnavailableError

    try:
        bundle, lines = _build(args)
    except (SeedImportError, ModelUnavailableError) as exc:
        print(f"import-seed: {exc}")
        return 1
    out = bundle.save(args.out)
    print(f"wrote {out} (bundle {bundle.bundle_id})")
    for line in lines:
        print(line)
    return 0


def summary_lines(bundle: Bundle) -> list[str]:
    """What was imported, and every species the catalog does not know (never dropped)."""
    missing = bundle.extra["catalog_missing"]
    prompts = bundle.extra["prompts"]
    lines = [
        f"  species: {len(bundle.species)} ({len(bundle.common)} in the head, "
        f"{len(bundle.species) - len(bundle.common)} prototype-only)",
        f"  model: {bundle.model_id} (fingerprint {bundle.model_fingerprint})",
        f"  temperature {bundle.temperature:.4f}, alpha {bundle.alpha}, thresholds "
        f"{bundle.thresholds.classifier_high} / {bundle.thresholds.prototype}",
        f"  prompts: {prompts['source']} {prompts['by_species']}",
    ]
    if "rank_thresholds" in bundle.extra:
        lines.append(summary_line(bundle.extra["rank_thresholds"]))
    if missing:
        lines.append(f"  {len(missing)} species are not in the catalog (kept, without taxonomy; "
                     "their text prompt is the seed's generic one unless --prompts gives one):")
        lines += [f"    {name}" for name in missing]
    else:
        lines.append("  every species matched the catalog exactly")
    return lines
