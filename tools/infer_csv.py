"""``biolit-id infer-csv``: identify a folder of photos offline into the seed's CSV.

The seed's users feed its CSV (``docs/seed-v4.md``, "Output CSV") to their
own scripts, so its columns and meanings are kept exactly. Rows come from the
very ``Identifier`` the gRPC service uses, with the service's data folder,
so a row says what the service would have answered. docs/training.md.
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biolit_id.cli.datasets import IMAGE_SUFFIXES, DatasetError, errors_path, read_embeddings
from biolit_id.cli.metrics import row_scores
from biolit_id.cli.seed_format import (
    ERRORS_COLUMNS,
    REJECTED_SPECIES,
    SEED_COLUMNS,
    SEED_RANKS,
    SEED_V2_COLUMNS,
    V2_PATH_HEADS,
    V2_PATH_SPECIES,
    V2_REJECTED_LABEL,
    V2_REJECTED_LEVEL,
    V2_SPECIES_LEVEL,
    confidence_text,
    method_name,
    read_feature_cache,
    taxonomy_columns,
    v2_margin,
    v2_percent,
    v2_rounded_percent,
)
from biolit_id.server.config import ServerConfig
from biolit_id.server.model_loader import DEFAULT_MODEL
from biolit_id.server.pipeline import InvalidRequestError
from biolit_id.server.routing import Method
from biolit_id.server.seed_v2 import RANK_TO_LEVEL
from biolit_id.server.seed_v2 import ROUTING as SEED_V2_ROUTING

log = logging.getLogger(__name__)

TOP_K = 3  # the seed's CSV shows three alternatives per component
# Not accepted as a species: the seed's acceptance rate counts species answers.
NOT_ACCEPTED = frozenset({method_name(Method.REJECTED), method_name(Method.TAXON),
                          V2_REJECTED_LEVEL})
TAXON_COLUMNS = ("taxon_pred", "taxon_rank")  # after every seed column, with --taxonomy
SEED_RANK_NAME = {rank: seed for seed, rank in SEED_RANKS.items()}


def find_images(root: Path, ext: str | None = None, recursive: bool = False) -> list[Path]:
    """Photos under ``root``, sorted, matching ``--ext`` (any case) or any known type."""
    wanted = {"." + ext.lower().lstrip(".")} if ext else set(IMAGE_SUFFIXES)
    if ext and ext.lower().lstrip(".") in {"jpg", "jpeg"}:
        wanted = {".jpg", ".jpeg"}
    candidates = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in wanted)


@dataclass
class BatchResult:
    rows: list[dict[str, str]]
    errors: list[tuple[str, str]]


def _candidates(row: dict[str, str], prefix: str, candidates: Sequence[tuple[str, float]]) -> None:
    names = [n for n, _ in candidates[:TOP_K]] + [""] * TOP_K
    row[f"top1_{prefix}"], row[f"top2_{prefix}"], row[f"top3_{prefix}"] = names[:TOP_K]
    row[f"conf_{prefix}"] = confidence_text(candidates[0][1]) if candidates else ""


class CsvIdentifier:
    """Photos -> seed CSV rows, through the service's own pipeline."""

    def __init__(self, state, taxonomy: bool = False, workers: int = 2) -> None:
        self.state = state
        self.identifier = state.identifier
        # A seed-v2 bundle writes the v2 seed's columns (its predictions.csv), like the seed.
        self.v2 = getattr(state.scorer, "mode", "") == SEED_V2_ROUTING
        if self.v2 and taxonomy:
            raise ValueError("--taxonomy adds the v4 seed's per-rank columns; a seed-v2 "
                             "bundle writes the v2 seed's columns, which have none")
        self.taxonomy = taxonomy
        self.options = self.identifier.options(TOP_K, 0, [])
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")

    @property
    def columns(self) -> list[str]:
        if self.v2:
            return list(SEED_V2_COLUMNS)
        return [*SEED_COLUMNS, *([*taxonomy_columns(), *TAXON_COLUMNS] if self.taxonomy else [])]

    def close(self) -> None:
        self._pool.shutdown()

    def _decode(self, path: Path) -> np.ndarray | str:
        """Pixels, or the reason the photo cannot be read."""
        from biolit_id.server.preprocess import ImageDecodeError

        try:
            return self.identifier.decode(path.read_bytes())
        except (ImageDecodeError, OSError) as exc:
            return str(exc) or type(exc).__name__

    def identify(self, paths: Sequence[Path], names: Sequence[str]) -> BatchResult:
        decoded = list(self._pool.map(self._decode, paths))
        errors = [(n, d) for n, d in zip(names, decoded, strict=True) if isinstance(d, str)]
        good = [(n, d) for n, d in zip(names, decoded, strict=True) if not isinstance(d, str)]
        if not good:
            return BatchResult([], errors)
        embeddings = self.identifier.embed_fn(np.stack([d for _, d in good]))
        return BatchResult(self.rows_for(embeddings, [n for n, _ in good]), errors)

    def identify_vectors(self, embeddings: np.ndarray, names: Sequence[str]) -> BatchResult:
        """``--embeddings``: each vector checked as the service checks a client's."""
        rows, errors, good, kept = [], [], [], []
        for name, vec in zip(names, embeddings, strict=True):
            try:
                good.append(self.identifier.check_embedding(vec))
                kept.append(name)
            except InvalidRequestError as exc:
                errors.append((name, str(exc)))
        if good:
            rows = self.rows_for(np.stack(good), kept)
        return BatchResult(rows, errors)

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
        """The v2 seed's row (REFERENCE.md §7), names as the seed spells them."""
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
        confidence = result.confidence
        if result.method == Method.TAXON:
            # The seed's rejection: its confidence is max(max p_common, max p_proto)
            # (docs/seed-v4.md, "Routing" rule 4; the zero-shot one is max p_proto),
            # the top candidates'.
            confidence = max((s for _, s in [*result.classifier_candidates[:1],
                                             *result.prototype_candidates[:1]]),
                             default=0.0)
        row = {
            "image": image,
            "espece_pred": result.species or REJECTED_SPECIES,
            "confiance": confidence_text(confidence),
            "methode": method_name(result.method if result.species else Method.REJECTED),
        }
        _candidates(row, "common", result.classifier_candidates)
        _candidates(row, "proto", result.prototype_candidates)
        if self.taxonomy:
            above = result.method == Method.TAXON
            row["taxon_pred"] = result.taxon if above else ""
            row["taxon_rank"] = SEED_RANK_NAME.get(result.rank, result.rank) if above else ""
        return row

    def _add_taxonomy(self, rows: list[dict[str, str]], embeddings: np.ndarray) -> None:
        """docs/seed-v4.md "Taxonomic confidence": routed distribution summed per taxon."""
        from biolit_id.server.taxonomy import rank_confidences

        protos = self.identifier.prototypes()
        scores = self.identifier.scorer.score(embeddings, protos)
        catalog = self.identifier.catalog
        ranks = list(SEED_RANKS.values())
        for i, row in enumerate(rows):
            answers = {a.rank: a for a in rank_confidences(row_scores(scores, i), protos.names,
                                                          catalog, ranks)}
            for seed_rank, rank in SEED_RANKS.items():
                a = answers.get(rank)
                row[f"pred_{seed_rank}"] = a.taxon if a else ""
                row[f"conf_{seed_rank}"] = confidence_text(a.confidence) if a else ""
                row[f"pred_{seed_rank}_2"] = a.runner_up if a else ""
                row[f"conf_{seed_rank}_2"] = (
                    confidence_text(a.runner_up_confidence) if a and a.runner_up else ""
                )


def summary(methods: Counter, identified: int, errors: int, output: Path) -> list[str]:
    """The seed's end-of-run report: counts per method (v2: per level) and the acceptance
    rate (v2: answers at any level)."""
    lines = [f"{identified} images identified -> {output}"]
    for name, count in sorted(methods.items(), key=lambda kv: (-kv[1], kv[0])):
        share = 100.0 * count / identified if identified else 0.0
        lines.append(f"  {name:<22} {count:>6}  ({share:5.1f} %)")
    accepted = sum(c for m, c in methods.items() if m not in NOT_ACCEPTED)
    rate = 100.0 * accepted / identified if identified else 0.0
    with_what = "an answer" if V2_SPECIES_LEVEL in methods or V2_REJECTED_LEVEL in methods \
        else "a species"
    lines.append(f"acceptance rate: {rate:.1f} % ({accepted}/{identified} with {with_what})")
    if errors:
        lines.append(f"{errors} unreadable images -> {errors_path(output)}")
    return lines


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
    parser.add_argument("--batch-size", type=int, default=16, help="photos per model call")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--data-dir", type=Path, default=defaults.data_dir,
                        help="the service's data folder: its added species and gallery photos "
                             "shape the answers; caches (default: %(default)s)")
    parser.add_argument("--runtime", choices=("torch", "onnx", "openvino"),
                        default=defaults.runtime)
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8"),
                        default=defaults.precision)
    parser.add_argument("--no-fast-decode", dest="fast_decode", action="store_false",
                        help="decode JPEGs at full size (slower, bit-exact with the seed)")


def run(args: argparse.Namespace) -> int:
    from biolit_id.index.gallery_base import GalleryError
    from biolit_id.index.store import StoreError
    from biolit_id.server.bundle import BundleError
    from biolit_id.server.model_loader import ModelUnavailableError
    from biolit_id.server.state import build_state

    if args.batch_size < 1:
        print("infer-csv: --batch-size must be at least 1")
        return 1
    try:
        items = _inputs(args)
    except (ValueError, OSError) as exc:
        print(f"infer-csv: {exc}")
        return 1
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
    try:
        return _write_csv(args, state, items)
    except ValueError as exc:  # options that do not fit the bundle
        print(f"infer-csv: {exc}")
        return 1
    except (StoreError, GalleryError) as exc:
        print(f"infer-csv: the gallery in {args.data_dir} failed: {exc}")
        return 1
    finally:
        state.batcher.close()
        state.gallery.close()


@dataclass
class Inputs:
    """What to identify: photo paths, or named embeddings."""

    names: list[str]
    paths: list[Path] | None = None
    embeddings: np.ndarray | None = None

    def batches(self, size: int) -> Iterator[tuple[slice, list[str]]]:
        for start in range(0, len(self.names), size):
            yield slice(start, start + size), self.names[start : start + size]


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


def _write_csv(args: argparse.Namespace, state, items: Inputs) -> int:
    from tqdm import tqdm

    if state.bundle is None:
        log.warning("no --bundle: zero-shot answers from the catalog's text prototypes")
    worker = CsvIdentifier(state, taxonomy=args.taxonomy, workers=args.workers)
    method_column = "best_level" if worker.v2 else "methode"
    methods: Counter = Counter()
    identified = failed = 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    err_file = errors_path(args.output)
    try:
        with open(args.output, "w", newline="", encoding="utf-8") as out, \
                open(err_file, "w", newline="", encoding="utf-8") as err, \
                tqdm(total=len(items.names), unit="img", desc="identifying") as bar:
            writer = csv.DictWriter(out, fieldnames=worker.columns)
            writer.writeheader()
            err_writer = csv.writer(err)
            err_writer.writerow(ERRORS_COLUMNS)
            for rows, names in items.batches(args.batch_size):
                if items.paths is not None:
                    result = worker.identify(items.paths[rows], names)
                else:
                    result = worker.identify_vectors(items.embeddings[rows], names)
                writer.writerows(result.rows)
                err_writer.writerows(result.errors)
                methods.update(r[method_column] for r in result.rows)
                identified += len(result.rows)
                failed += len(result.errors)
                bar.update(len(names))
    finally:
        worker.close()
    for line in summary(methods, identified, failed, args.output):
        print(line)
    return 0
