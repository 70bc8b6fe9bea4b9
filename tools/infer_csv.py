"""``biolit-id infer-csv``: identify a folder of photos offline into the seed's CSV.

The seed's users feed its CSV (``docs/seed-v4.md``, "Output CSV") to their
own scripts, so its columns and meanings are kept exactly. Rows come from the
very ``Identifier`` the gRPC service uses, with the service's data folder,
so a row says what the service would have answered. docs/training.md.
With ``--server`` a running service answers instead (``infer_csv_server``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from biolit_id.cli.seedcompat.csv_rows import InProcessRows, Inputs, seed_row, write_csv
from biolit_id.cli.seedcompat.formats import (
    SEED_COLUMNS,
    SEED_RANKS,
    SEED_V2_COLUMNS,
    V2_PATH_HEADS,
    V2_PATH_SPECIES,
    V2_REJECTED_LABEL,
    V2_REJECTED_LEVEL,
    V2_SPECIES_LEVEL,
    confidence_text,
    read_feature_cache,
    taxonomy_columns,
    v2_margin,
    v2_percent,
    v2_rounded_percent,
)
from biolit_id.cli.training.datasets import DatasetError, read_embeddings
from biolit_id.cli.training.datasets import errors_path as errors_path  # where the tests look
from biolit_id.server.config import ServerConfig
from biolit_id.server.decision.seed_v2 import RANK_TO_LEVEL
from biolit_id.server.decision.seed_v2 import ROUTING as SEED_V2_ROUTING
from biolit_id.server.inference.embedders.base import PRECISIONS, RUNTIMES
from biolit_id.server.inference.embedders.calibration import IMAGE_SUFFIXES
from biolit_id.server.inference.model_loader import DEFAULT_MODEL

log = logging.getLogger(__name__)

TAXON_COLUMNS = ("taxon_pred", "taxon_rank")  # after every seed column, with --taxonomy


def find_images(root: Path, ext: str | None = None, recursive: bool = False) -> list[Path]:
    """Photos under ``root``, sorted, matching ``--ext`` (any case) or any known type."""
    wanted = {"." + ext.lower().lstrip(".")} if ext else set(IMAGE_SUFFIXES)
    if ext and ext.lower().lstrip(".") in {"jpg", "jpeg"}:
        wanted = {".jpg", ".jpeg"}
    candidates = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in wanted)


class CsvIdentifier(InProcessRows):
    """Photos -> seed CSV rows, through the service's own pipeline."""

    def __init__(self, state, taxonomy: bool = False, workers: int = 2) -> None:
        super().__init__(state, workers)
        # A seed-v2 bundle writes the v2 seed's columns (its predictions.csv), like the seed.
        self.v2 = getattr(state.scorer, "mode", "") == SEED_V2_ROUTING
        if self.v2 and taxonomy:
            raise ValueError("--taxonomy adds the v4 seed's per-rank columns; a seed-v2 "
                             "bundle writes the v2 seed's columns, which have none")
        self.taxonomy = taxonomy

    @property
    def columns(self) -> list[str]:
        if self.v2:
            return list(SEED_V2_COLUMNS)
        return [*SEED_COLUMNS, *([*taxonomy_columns(), *TAXON_COLUMNS] if self.taxonomy else [])]

    def rows_for(self, vectors: np.ndarray, names: Sequence[str]) -> list[dict[str, str]]:
        """Rows for unit embeddings of the serving model."""
        results = self.identifier.identify_embeddings(vectors, [self.options] * len(names))
        if self.v2:
            return [self._row_v2(name, r) for name, r in zip(names, results, strict=True)]
        rows = [self._row(name, r) for name, r in zip(names, results, strict=True)]
        if self.taxonomy:
            self._add_taxonomy(rows, vectors)
        return rows

    def _row_v2(self, image: str, result) -> dict[str, str]:
        """The v2 seed's row (docs/seed-v2.md), names as the seed spells them."""
        seed_name = self.state.scorer.settings.seed_name
        protos = result.prototype_candidates
        p1 = protos[0][1] if protos else 0.0
        p2 = protos[1][1] if len(protos) > 1 else 0.0
        if result.rank == "species":
            level, label = V2_SPECIES_LEVEL, seed_name(result.species)
        elif result.rank:
            level, label = RANK_TO_LEVEL[result.rank], result.taxon
        else:
            level, label = V2_REJECTED_LEVEL, V2_REJECTED_LABEL
        return {
            "image": image,
            "best_level": level,
            "best_label": label,
            "best_score": v2_percent(result.confidence if result.rank else 0.0),
            "margin": v2_margin(p1 - p2),
            "path": V2_PATH_SPECIES if result.rank == "species" else V2_PATH_HEADS,
            "top1_espece": seed_name(protos[0][0]) if protos else "",
            "conf_espece": v2_rounded_percent(p1),
            "top2_espece": seed_name(protos[1][0]) if len(protos) > 1 else "",
        }

    def _row(self, image: str, result) -> dict[str, str]:
        return seed_row(image, result, self.taxonomy)

    def _add_taxonomy(self, rows: list[dict[str, str]], embeddings: np.ndarray) -> None:
        """docs/seed-v4.md "Taxonomic confidence": routed distribution summed per taxon."""
        from biolit_id.server.decision.ranks import rank_confidences

        protos = self.identifier.prototypes()
        scores = self.identifier.scorer.score(embeddings, protos)
        catalog = self.identifier.catalog
        ranks = list(SEED_RANKS.values())
        for i, row in enumerate(rows):
            answers = {a.rank: a for a in rank_confidences(scores.distribution[i], protos.names,
                                                          catalog, ranks)}
            for seed_rank, rank in SEED_RANKS.items():
                a = answers.get(rank)
                row[f"pred_{seed_rank}"] = a.taxon if a else ""
                row[f"conf_{seed_rank}"] = confidence_text(a.confidence) if a else ""
                row[f"pred_{seed_rank}_2"] = a.runner_up if a else ""
                row[f"conf_{seed_rank}_2"] = (
                    confidence_text(a.runner_up_confidence) if a and a.runner_up else ""
                )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of photos")
    source.add_argument("--embeddings", type=Path,
                        help="embeddings already made by the serving model instead of photos: "
                             "the seed v2's feature cache (bioclip_features.npz: features, "
                             "image_paths) or `biolit-id embed`'s parquet")
    parser.add_argument("--output", type=Path, required=True, help="CSV to write")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="trained or imported bundle (without it: zero-shot)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="hf-hub:ORG/REPO or local-dir:PATH (default: %(default)s)")
    parser.add_argument("--ext", default=None,
                        help="only this extension, e.g. webp (default: every image type)")
    parser.add_argument("--recursive", action="store_true", help="include sub-folders")
    parser.add_argument("--taxonomy", action="store_true",
                        help="add pred_/conf_ columns for genre..embranchement")
    parser.add_argument("--format", choices=("seed", "dwc"), default="seed",
                        help="seed: the seed's columns; dwc: Darwin Core terms, one row per "
                             "photo, for `biolit-id export-dwca` (docs/darwin-core.md)")
    parser.add_argument("--batch-size", type=int, default=16, help="photos per model call")
    parser.add_argument("--workers", type=int, default=2,
                        help="decoding threads (with --server: calls in flight)")
    parser.add_argument("--data-dir", type=Path, default=defaults.data_dir,
                        help="the service's data folder: its added species and gallery photos "
                             "shape the answers; caches (default: %(default)s)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=defaults.runtime)
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)
    parser.add_argument("--no-fast-decode", dest="fast_decode", action="store_false",
                        help="decode JPEGs at full size (slower, bit-exact with the seed)")
    remote = parser.add_argument_group(
        "a running service instead of the model in-process (same CSV columns)")
    remote.add_argument("--server", metavar="HOST:PORT",
                        help="send each photo to this service; --model, --bundle, "
                             "--data-dir and --runtime are then the server's")
    remote.add_argument("--api-key", help="sent as 'authorization: Bearer KEY'")
    remote.add_argument("--tls-ca", type=Path, help="CA certificate for a TLS server")
    remote.add_argument("--timeout", type=float, default=60.0, help="seconds per photo")
    remote.add_argument("--send-originals", action="store_true",
                        help="send photos as they are (default: downsized like "
                             "`biolit-id identify`)")


def run(args: argparse.Namespace) -> int:
    from biolit_id.index.base import GalleryError
    from biolit_id.index.store import StoreError
    from biolit_id.server.decision.bundle import BundleError
    from biolit_id.server.inference.model_loader import ModelUnavailableError
    from biolit_id.server.wiring import build_state

    if args.batch_size < 1:
        print("infer-csv: --batch-size must be at least 1")
        return 1
    try:
        items = _inputs(args)
    except (ValueError, OSError) as exc:
        print(f"infer-csv: {exc}")
        return 1
    if args.format == "dwc" and (args.server or args.taxonomy):
        print("infer-csv: --format dwc runs in-process and has its own rank columns: "
              "drop --server and --taxonomy")
        return 1
    if args.server:
        from biolit_id.cli.client.infer_csv_remote import run_remote

        return run_remote(args, items)
    config = ServerConfig(model=args.model, bundle=args.bundle, data_dir=args.data_dir,
                          runtime=args.runtime, precision=args.precision,
                          fast_decode=args.fast_decode)
    try:
        state = build_state(config)
    except (ModelUnavailableError, BundleError) as exc:
        print(f"infer-csv: {exc}")
        return 1
    except (StoreError, GalleryError) as exc:
        print(f"infer-csv: cannot read the gallery in {args.data_dir}: {exc}")
        return 1
    if state.bundle is None:
        log.warning("no --bundle: zero-shot answers from the catalog's text prototypes")
    try:
        if args.format == "dwc":
            from biolit_id.cli.darwin_core.rows import DwcIdentifier, write_dwc_csv

            return write_dwc_csv(args, DwcIdentifier(state, workers=args.workers), items)
        return write_csv(args, CsvIdentifier(state, taxonomy=args.taxonomy,
                                             workers=args.workers), items)
    except ValueError as exc:  # options that do not fit the bundle
        print(f"infer-csv: {exc}")
        return 1
    except (StoreError, GalleryError) as exc:
        print(f"infer-csv: the gallery in {args.data_dir} failed: {exc}")
        return 1
    finally:
        state.batcher.close()
        state.gallery.close()


def _inputs(args: argparse.Namespace) -> Inputs:
    if args.embeddings is not None:
        path = args.embeddings
        if not path.is_file():
            raise ValueError(f"{path} does not exist")
        if path.suffix == ".npz":
            names, vectors = read_feature_cache(path)
        else:
            try:
                data = read_embeddings(path)
            except DatasetError as exc:
                raise ValueError(str(exc)) from None
            names = [img or f"row{i}" for i, img in enumerate(data.images)]
            vectors = data.embeddings
        if not names:
            raise ValueError(f"{path} holds no embeddings")
        return Inputs(names=names, embeddings=vectors)
    if not args.images.is_dir():
        raise ValueError(f"{args.images} is not a folder")
    paths = find_images(args.images, args.ext, args.recursive)
    if not paths:
        kind = f"*.{args.ext}" if args.ext else "image"
        where = "under" if args.recursive else "in"
        raise ValueError(f"no {kind} files {where} {args.images}")
    return Inputs(names=[p.relative_to(args.images).as_posix() for p in paths], paths=paths)
