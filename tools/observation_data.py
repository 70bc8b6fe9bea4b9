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
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biolit_id.cli.datasets import META_KEY, DatasetError
from biolit_id.core.atomic import atomic_open
from biolit_id.server.prior import day_angle

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
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"observations file {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DatasetError(f"{path} is not a readable parquet file: {exc}") from None
    missing = set(REQUIRED) - set(table.column_names)
    if missing:
        raise DatasetError(f"{path} lacks column(s) {sorted(missing)}")
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

    emb_col = table.column("embedding").combine_chunks()
    lengths = set(emb_col.value_lengths().to_numpy(zero_copy_only=False).tolist())
    if len(lengths) > 1:
        raise DatasetError(f"{path}: embeddings have different lengths {sorted(lengths)}")
    dim = lengths.pop() if lengths else 0
    flat = emb_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    on_target = (np.array(table.column("on_target").to_pylist(), dtype=bool)
                 if "on_target" in cols else np.ones(len(owner), dtype=bool))
    meta_raw = (table.schema.metadata or {}).get(META_KEY)
    return ObservationSet(
        ids=ids,
        species=[str(s) for s in per_obs("species", "")],
        embeddings=flat.reshape(len(owner), dim),
        owner=owner,
        latitude=np.array(per_obs("decimalLatitude", np.nan), dtype=np.float64),
        longitude=np.array(per_obs("decimalLongitude", np.nan), dtype=np.float64),
        uncertainty_km=np.array(per_obs("coordinateUncertaintyInMeters", 0.0),
                                dtype=np.float64) / 1000.0,
        day=np.array([_date_angle(d) for d in per_obs("eventDate", "")]),
        on_target=on_target,
        columns={c: [str(v) for v in per_obs(c, "")] for c in ("set", "role") if c in cols},
        meta=json.loads(meta_raw) if meta_raw else {},
    )


def write_observations(path: Path, rows: dict[str, list], embeddings: np.ndarray,
                       meta: dict) -> Path:
    """``rows``: per-photo columns (observation_id, species, ...) beside ``embeddings``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    dim = emb.shape[1]
    offsets = pa.array(np.arange(len(emb) + 1) * dim, type=pa.int32())
    columns = {k: pa.array(v) for k, v in rows.items()}
    columns["embedding"] = pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1)))
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        pq.write_table(table, f)
    return path
