"""``biolit-id infer-csv``: identify a folder of photos offline into the seed's CSV.

The seed's users feed its CSV (``REFERENCE.md``, "Output CSV") to their own
scripts, so the columns, method names and ``?`` for a rejection are kept
exactly, with the seed's meaning: an answer above species level (the
service's ``taxon`` method, which the seed did not have) is written as the
seed would: ``?``, ``rejected``, the rejection's confidence. With
``--taxonomy`` the seed v6's per-rank columns follow, then ``taxon_pred``
and ``taxon_rank`` (the taxon answered, its seed rank name; empty for
species answers and rejections). The photos go through the very
``Identifier`` the gRPC service uses (built by ``server.state.build_state``,
no port opened), so a row says what the service would have answered.

``--data-dir`` is the service's data folder (default ``./data``), on
purpose: its catalog additions and its gallery's curator photos shape the
prototypes, hence the answers. The gallery is only read, and closed at the
end; its snapshot is written through a temporary file of this process's
own, so running next to a server on the same folder is safe.
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

from biolit_id.cli.datasets import IMAGE_SUFFIXES, errors_path
from biolit_id.cli.metrics import row_scores
from biolit_id.cli.seed_format import (
    ERRORS_COLUMNS,
    REJECTED_SPECIES,
    SEED_COLUMNS,
    SEED_RANKS,
    confidence_text,
    method_name,
    taxonomy_columns,
)
from biolit_id.server.config import ServerConfig
from biolit_id.server.model_loader import DEFAULT_MODEL
from biolit_id.server.routing import Method

log = logging.getLogger(__name__)

TOP_K = 3  # the seed's CSV shows three alternatives per component
# Not accepted as a species: the seed's acceptance rate counts species answers.
NOT_ACCEPTED = frozenset({method_name(Method.REJECTED), method_name(Method.TAXON)})
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
        self.taxonomy = taxonomy
        self.options = self.identifier.options(TOP_K, 0, [])
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")

    @property
    def columns(self) -> list[str]:
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
        results = self.identifier.identify_embeddings(embeddings, [self.options] * len(good))
        rows = [self._row(name, r) for (name, _), r in zip(good, results, strict=True)]
        if self.taxonomy:
            self._add_taxonomy(rows, embeddings)
        return BatchResult(rows, errors)

    def _row(self, image: str, result) -> dict[str, str]:
        confidence = result.confidence
        if result.method == Method.TAXON:
            # The seed's rejection: its confidence is max(max p_common, max p_proto)
            # (REFERENCE.md rule 4; the zero-shot one is max p_proto), the top candidates'.
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
        """REFERENCE.md "Taxonomic confidence": routed distribution summed per taxon."""
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


def batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def summary(methods: Counter, identified: int, errors: int, output: Path) -> list[str]:
    """The seed's end-of-run report: counts per method and the acceptance rate."""
    lines = [f"{identified} images identified -> {output}"]
    for name, count in sorted(methods.items(), key=lambda kv: (-kv[1], kv[0])):
        share = 100.0 * count / identified if identified else 0.0
        lines.append(f"  {name:<22} {count:>6}  ({share:5.1f} %)")
    accepted = sum(c for m, c in methods.items() if m not in NOT_ACCEPTED)
    rate = 100.0 * accepted / identified if identified else 0.0
    lines.append(f"acceptance rate: {rate:.1f} % ({accepted}/{identified} with a species)")
    if errors:
        lines.append(f"{errors} unreadable images -> {errors_path(output)}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    parser.add_argument("--images", type=Path, required=True, help="folder of photos")
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

    if not args.images.is_dir():
        print(f"infer-csv: {args.images} is not a folder")
        return 1
    if args.batch_size < 1:
        print("infer-csv: --batch-size must be at least 1")
        return 1
    paths = find_images(args.images, args.ext, args.recursive)
    if not paths:
        kind = f"*.{args.ext}" if args.ext else "image"
        where = "under" if args.recursive else "in"
        print(f"infer-csv: no {kind} files {where} {args.images}")
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
        return _write_csv(args, state, paths)
    except (StoreError, GalleryError) as exc:
        print(f"infer-csv: the gallery in {args.data_dir} failed: {exc}")
        return 1
    finally:
        state.batcher.close()
        state.gallery.close()


def _write_csv(args: argparse.Namespace, state, paths: list[Path]) -> int:
    from tqdm import tqdm

    if state.bundle is None:
        log.warning("no --bundle: zero-shot answers from the catalog's text prototypes")
    worker = CsvIdentifier(state, taxonomy=args.taxonomy, workers=args.workers)
    methods: Counter = Counter()
    identified = failed = 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    err_file = errors_path(args.output)
    try:
        with open(args.output, "w", newline="", encoding="utf-8") as out, \
                open(err_file, "w", newline="", encoding="utf-8") as err, \
                tqdm(total=len(paths), unit="img", desc="identifying") as bar:
            writer = csv.DictWriter(out, fieldnames=worker.columns)
            writer.writeheader()
            err_writer = csv.writer(err)
            err_writer.writerow(ERRORS_COLUMNS)
            for chunk in batches(paths, args.batch_size):
                names = [p.relative_to(args.images).as_posix() for p in chunk]
                result = worker.identify(chunk, names)
                writer.writerows(result.rows)
                err_writer.writerows(result.errors)
                methods.update(r["methode"] for r in result.rows)
                identified += len(result.rows)
                failed += len(result.errors)
                bar.update(len(chunk))
    finally:
        worker.close()
    for line in summary(methods, identified, failed, args.output):
        print(line)
    return 0
