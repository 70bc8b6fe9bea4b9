"""``biolit-id export-decision --bundle B --out F.onnx``: the bundle's decision as a graph.

The whole scoring and decision of the bundle's routing (whitening, prototypes,
head, fusion, temperature, thresholds, rank answers) as one ONNX graph:
input ``embedding`` [N, D], outputs ``probabilities`` [N, S] and ``answer`` [N]
(species index, -1 for none at species level), with ``method``,
``confidence``, ``rank`` and ``taxon``; the species, ranks and taxa travel in
its metadata. The graph is built by ``server.device.decision_graph`` (the one
the service serves at ``/v1/models/decision``), over the bundle's own
prototypes. Needs the ``[onnx]`` extra.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from biolit_id.index.core.atomic import atomic_write
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import BundleError, load_bundle
from biolit_id.server.decision.registry import scorer_for
from biolit_id.server.device.decision_graph import (
    DecisionExportError,
    bundle_prototypes,
    export_decision,
    metadata_of,
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle directory")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")


def run(args: argparse.Namespace) -> int:
    try:
        bundle = load_bundle(args.bundle)
        model = export_decision(scorer_for(bundle), bundle_prototypes(bundle),
                                Catalog.load_default())
    except (BundleError, DecisionExportError) as exc:
        log.error("%s", exc)
        return 2
    except ImportError as exc:
        log.error("export-decision needs the onnx package (pip install 'biolit-id[onnx]'): %s",
                  exc)
        return 2
    data = model.SerializeToString()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, data)
    meta = metadata_of(model)
    print(f"wrote {args.out} ({len(data)} bytes): routing {meta['routing']}, "
          f"{len(json.loads(meta['species']))} species, rank answers at "
          f"{', '.join(json.loads(meta['ranks'])) or 'no rank'}")
    return 0
