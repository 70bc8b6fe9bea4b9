"""What ``infer-csv`` writes, whoever answered: the seed's rows, CSV and summary.

Shared by the in-process mode (``infer_csv``) and the server mode
(``infer_csv_server``), so both write the same columns the same way.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biolit_id.cli.seedcompat.formats import (
    ERRORS_COLUMNS,
    REJECTED_SPECIES,
    SEED_RANKS,
    V2_REJECTED_LEVEL,
    V2_SPECIES_LEVEL,
    confidence_text,
    method_name,
)
from biolit_id.cli.training.datasets import errors_path
from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.server.decision.types import Method

TOP_K = 3  # the seed's CSV shows three alternatives per component
# Not accepted as a species: the seed's acceptance rate counts species answers.
NOT_ACCEPTED = frozenset({method_name(Method.REJECTED), method_name(Method.TAXON),
                          V2_REJECTED_LEVEL})
SEED_RANK_NAME = {rank: seed for seed, rank in SEED_RANKS.items()}


@dataclass
class BatchResult:
    rows: list[dict[str, str]]
    errors: list[tuple[str, str]]


def _candidates(row: dict[str, str], prefix: str, candidates: Sequence[tuple[str, float]]) -> None:
    names = [n for n, _ in candidates[:TOP_K]] + [""] * TOP_K
    row[f"top1_{prefix}"], row[f"top2_{prefix}"], row[f"top3_{prefix}"] = names[:TOP_K]
    row[f"conf_{prefix}"] = confidence_text(candidates[0][1]) if candidates else ""


def seed_row(image: str, result, taxonomy: bool = False) -> dict[str, str]:
    """The v4 seed's row for one answer (in-process or from a server's response)."""
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
    if taxonomy:
        above = result.method == Method.TAXON
        row["taxon_pred"] = result.taxon if above else ""
        row["taxon_rank"] = SEED_RANK_NAME.get(result.rank, result.rank) if above else ""
    return row


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


@dataclass
class Inputs:
    """What to identify: photo paths, or named embeddings."""

    names: list[str]
    paths: list[Path] | None = None
    embeddings: np.ndarray | None = None

    def batches(self, size: int) -> Iterator[tuple[slice, list[str]]]:
        for start in range(0, len(self.names), size):
            yield slice(start, start + size), self.names[start : start + size]


def write_csv(args: argparse.Namespace, worker, items: Inputs) -> int:
    """Rows from ``worker`` (in-process or a server's answers) into the CSV and its
    errors file, then the seed's summary; the worker is closed at the end."""
    method_column = "best_level" if worker.v2 else "methode"
    methods: Counter = Counter()
    identified, failed = write_rows(args, worker, items,
                                    lambda rows: methods.update(r[method_column] for r in rows))
    for line in summary(methods, identified, failed, args.output):
        print(line)
    return 0


def write_rows(args: argparse.Namespace, worker, items: Inputs,
               tally: Callable[[list[dict[str, str]]], object]) -> tuple[int, int]:
    """Every batch's rows into ``args.output`` and its unreadable photos into the errors
    file, ``tally`` told of each batch; (rows written, photos failed). Closes ``worker``."""
    from tqdm import tqdm

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
                tally(result.rows)
                identified += len(result.rows)
                failed += len(result.errors)
                bar.update(len(names))
    finally:
        worker.close()
    return identified, failed


class InProcessRows:
    """Photos or embeddings -> rows, through the service's own pipeline in this process;
    a subclass says what a row holds (``rows_for``)."""

    columns: list[str] | tuple[str, ...] = ()
    v2 = False

    def __init__(self, state, workers: int = 2) -> None:
        self.state = state
        self.identifier = state.identifier
        self.options = self.identifier.options(TOP_K, 0, [])
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")

    def close(self) -> None:
        self._pool.shutdown()

    def _decode(self, path: Path) -> np.ndarray | str:
        """Pixels, or the reason the photo cannot be read."""
        from biolit_id.server.inference.preprocess import ImageDecodeError

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
        raise NotImplementedError
