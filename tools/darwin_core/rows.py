"""``biolit-id infer-csv --format dwc``: one Darwin Core record per photo, as CSV.

The answers come from the service's own ``Identifier`` (as the seed-format
rows do), each turned into protobuf by ``grpc.messages`` and into terms by
``grpc.darwin_core``, so a row says what ``POST /v1/identify-observation/dwc``
would say of that photo alone. A photo's place and date are read from its
EXIF (``DateTimeOriginal``, GPS) when it has them. Every photo gets a row,
rejections included (no ``scientificName``, ``taxonRank``): ``export-dwca``
leaves those out (docs/darwin-core.md).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from biolit_id.cli.seedcompat.csv_rows import BatchResult, InProcessRows, Inputs, write_rows
from biolit_id.cli.training.datasets import errors_path
from biolit_id.server.grpc.darwin_core import TERMS, Event, occurrence
from biolit_id.server.grpc.messages import decision_parts, species_message

# EXIF tags (PIL): the Exif and GPS sub-IFDs, DateTimeOriginal, the GPS fields.
EXIF_IFD, GPS_IFD, DATE_TIME_ORIGINAL, DATE_TIME = 0x8769, 0x8825, 0x9003, 0x0132
GPS_LAT_REF, GPS_LAT, GPS_LON_REF, GPS_LON, GPS_H_ERROR = 1, 2, 3, 4, 31


def _degrees(value) -> float:
    d, m, s = (float(x) for x in value)
    return d + m / 60.0 + s / 3600.0


def photo_event(path: Path) -> Event:
    """A photo's date and GPS position from its EXIF; an empty Event when it has none."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            exif = img.getexif()
            stamp = exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL) or exif.get(DATE_TIME)
            gps = exif.get_ifd(GPS_IFD)
    except (OSError, ValueError, SyntaxError):
        return Event()
    date = ""
    if isinstance(stamp, str):
        try:
            date = datetime.strptime(stamp.strip("\x00 "), "%Y:%m:%d %H:%M:%S").isoformat()
        except ValueError:
            date = ""
    lat = lon = None
    uncertainty = 0.0
    try:
        if gps.get(GPS_LAT) and gps.get(GPS_LON):
            lat = _degrees(gps[GPS_LAT]) * (-1 if gps.get(GPS_LAT_REF) == "S" else 1)
            lon = _degrees(gps[GPS_LON]) * (-1 if gps.get(GPS_LON_REF) == "W" else 1)
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                lat = lon = None
            uncertainty = float(gps.get(GPS_H_ERROR) or 0.0)
    except (TypeError, ValueError, ZeroDivisionError):
        lat = lon = None
    return Event(date=date, latitude=lat, longitude=lon, uncertainty_m=uncertainty)


class DwcIdentifier(InProcessRows):
    """Photos (or embeddings) -> Darwin Core rows, through the service's pipeline; each
    photo's place and date from its EXIF."""

    columns: tuple[str, ...] = TERMS

    def __init__(self, state, workers: int = 2, id_prefix: str = "") -> None:
        super().__init__(state, workers)
        self.id_prefix = id_prefix
        self.versions = state.versions()
        self.identified_at = datetime.now(timezone.utc)
        self._events: dict[str, Event] = {}

    def identify(self, paths: Sequence[Path], names: Sequence[str]) -> BatchResult:
        self._events = dict(zip(names, self._pool.map(photo_event, paths), strict=True))
        return super().identify(paths, names)

    def rows_for(self, vectors: np.ndarray, names: Sequence[str]) -> list[dict[str, str]]:
        results = self.identifier.identify_embeddings(vectors, [self.options] * len(names))
        rows = []
        for name, result in zip(names, results, strict=True):
            decision, taxonomy, _ = decision_parts(result)
            species = None
            if result.species and result.record is not None:
                species = species_message(result.record, False, False, False)
            record = occurrence(decision, taxonomy, self.versions, species=species,
                                event=self._events.get(name, Event()),
                                occurrence_id=self.id_prefix + name, media=name,
                                identified_at=self.identified_at)
            rows.append(record.terms)
        return rows


def write_dwc_csv(args: argparse.Namespace, worker: DwcIdentifier, items: Inputs) -> int:
    """Rows into ``args.output`` (CSV, a header of Darwin Core terms) and its errors file;
    the worker is closed at the end."""
    ranks: Counter = Counter()
    _, failed = write_rows(args, worker, items, lambda rows: ranks.update(
        r["taxonRank"] or "(not identified)" for r in rows))
    err_file = errors_path(args.output)
    total = sum(ranks.values())
    print(f"{total} images identified -> {args.output} (Darwin Core)")
    for rank, count in sorted(ranks.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {rank:<22} {count:>6}")
    if failed:
        print(f"{failed} unreadable images -> {err_file}")
    return 0
