"""Labelled observations on disk: one parquet row per photo, grouped by ``observation_id``.

Columns: ``observation_id`` (str), ``species`` (the observation's true
species, str), ``embedding`` (list<float32>, same model as the bundle),
Darwin Core ``decimalLatitude``, ``decimalLongitude`` (degrees, null when
unknown), ``eventDate`` (``YYYY-MM-DD`` or ""), optional
``coordinateUncertaintyInMeters``. Photos keep their file order within an
observation (the first is "the first photo"). Synthetic sets add
``on_target`` (the photo shows the observation's species), ``set`` and
``role`` (see ``observations_synth``). The schema metadata records the model,
as ``datasets`` does for photo embeddings.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biolit_id.cli.training.datasets import (
    embedding_column,
    embedding_rows,
    read_table,
    table_meta,
    write_table,
)
from biolit_id.server.decision.prior import day_angle

REQUIRED = ("observation_id", "species", "embedding")


@dataclass
class ObservationSet:
    ids: list[str]  # [N]
    species: list[str]  # [N]
    embeddings: np.ndarray  # [M, D] one row per photo
    owner: np.ndarray  # [M] observation index of each photo
    latitude: np.ndarray  # [N] NaN when unknown
    longitude: np.ndarray  # [N]
    uncertainty_km: np.ndarray  # [N]
    day: np.ndarray  # [N] day angle (radians), NaN when unknown
    on_target: np.ndarray  # [M] bool (all True when the file does not say)
    columns: dict[str, list[str]] = field(default_factory=dict)  # per observation: set, role
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.owner, minlength=len(self.ids))

    def padded(self, rows: np.ndarray, photos: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Per-photo rows [M, S] -> [N, K, S] and the mask of real photos [N, K].

        ``photos`` [M] bool selects which photos count (default: all).
        """
        use = np.ones(len(self.owner), dtype=bool) if photos is None else photos
        k = max(1, int(np.bincount(self.owner[use], minlength=len(self.ids)).max(initial=1)))
        out = np.zeros((len(self.ids), k, rows.shape[1]))
        mask = np.zeros((len(self.ids), k), dtype=bool)
        slot = np.zeros(len(self.ids), dtype=np.int64)
        for m in np.flatnonzero(use):
            o = self.owner[m]
            out[o, slot[o]] = rows[m]
            mask[o, slot[o]] = True
            slot[o] += 1
        return out, mask

    def first_photos(self) -> np.ndarray:
        first = np.zeros(len(self.owner), dtype=bool)
        seen: set[int] = set()
        for m, o in enumerate(self.owner.tolist()):
            if o not in seen:
                first[m] = True
                seen.add(o)
        return first

    def has_place_or_date(self) -> np.ndarray:
        return ~np.isnan(self.latitude) | ~np.isnan(self.day)


def _date_angle(text: str | None) -> float:
    if not text:
        return float("nan")
    try:
        return day_angle(dt.date.fromisoformat(str(text)[:10]))
    except ValueError:
        return float("nan")


def read_observations(path: Path) -> ObservationSet:
    table = read_table(path, REQUIRED, "observations")
    cols = table.column_names
    photo_obs = [str(v) for v in table.column("observation_id").to_pylist()]
    ids = list(dict.fromkeys(photo_obs))
    index = {o: i for i, o in enumerate(ids)}
    owner = np.array([index[o] for o in photo_obs], dtype=np.int64)
    first = np.full(len(ids), -1)
    for m in range(len(owner) - 1, -1, -1):
        first[owner[m]] = m

    def per_obs(name: str, default):
        if name not in cols:
            return [default] * len(ids)
        values = table.column(name).to_pylist()
        return [values[m] if values[m] is not None else default for m in first]

    on_target = (np.array(table.column("on_target").to_pylist(), dtype=bool)
                 if "on_target" in cols else np.ones(len(owner), dtype=bool))
    return ObservationSet(
        ids=ids,
        species=[str(s) for s in per_obs("species", "")],
        embeddings=embedding_rows(table, path),
        owner=owner,
        latitude=np.array(per_obs("decimalLatitude", np.nan), dtype=np.float64),
        longitude=np.array(per_obs("decimalLongitude", np.nan), dtype=np.float64),
        uncertainty_km=np.array(per_obs("coordinateUncertaintyInMeters", 0.0),
                                dtype=np.float64) / 1000.0,
        day=np.array([_date_angle(d) for d in per_obs("eventDate", "")]),
        on_target=on_target,
        columns={c: [str(v) for v in per_obs(c, "")] for c in ("set", "role") if c in cols},
        meta=table_meta(table),
    )


def write_observations(path: Path, rows: dict[str, list], embeddings: np.ndarray,
                       meta: dict) -> Path:
    """``rows``: per-photo columns (observation_id, species, ...) beside ``embeddings``."""
    import pyarrow as pa

    columns = {k: pa.array(v) for k, v in rows.items()}
    columns["embedding"] = embedding_column(embeddings)
    return write_table(path, columns, meta)
