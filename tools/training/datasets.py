"""Embedding sets on disk (parquet), the seeded stratified split and data fingerprints.

One parquet layout is shared by ``embed``, ``train``, ``calibrate`` and
``evaluate``: columns ``species`` (str), ``embedding`` (list<float32>) and
``image`` (path str). The schema metadata records which model made the
vectors, so a set embedded with another model is refused instead of scored
as garbage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biolit_id.index.core.atomic import atomic_open

META_KEY = b"biolit.embeddings"


def errors_path(output: Path) -> Path:
    """``results.csv`` -> ``results.errors.csv``: unreadable photos listed beside the output."""
    return output.with_name(output.stem + ".errors.csv")


class DatasetError(ValueError):
    """An embeddings file that cannot be used; the message says why."""


@dataclass
class EmbeddingSet:
    species: list[str]
    embeddings: np.ndarray  # [N, D] float32
    images: list[str]
    meta: dict = field(default_factory=dict)  # model_id, model_fingerprint, preprocessing

    def __len__(self) -> int:
        return len(self.species)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1]) if self.embeddings.ndim == 2 else 0

    def subset(self, rows: np.ndarray | Sequence[int]) -> EmbeddingSet:
        rows = np.asarray(rows, dtype=np.int64)
        return EmbeddingSet(
            species=[self.species[i] for i in rows],
            embeddings=self.embeddings[rows],
            images=[self.images[i] for i in rows],
            meta=dict(self.meta),
        )

    def concat(self, other: EmbeddingSet) -> EmbeddingSet:
        """This set's rows, then ``other``'s (same model)."""
        return EmbeddingSet(species=[*self.species, *other.species],
                            embeddings=np.concatenate([self.embeddings, other.embeddings]),
                            images=[*self.images, *other.images], meta=dict(self.meta))

    def counts(self) -> dict[str, int]:
        names, counts = np.unique(np.asarray(self.species, dtype=object), return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts, strict=True)}

    def check_model(self, fingerprint: str | None, dim: int | None, what: str) -> None:
        """Refuse vectors from another model or of another size, naming both."""
        if dim is not None and len(self) and self.dim != dim:
            raise DatasetError(
                f"{what}: embeddings are {self.dim}-d but the {dim}-d model/bundle expects {dim}"
            )
        made_by = self.meta.get("model_fingerprint")
        if fingerprint and made_by and made_by != fingerprint:
            raise DatasetError(
                f"{what}: embeddings were made by model {self.meta.get('model_id')!r} "
                f"(fingerprint {made_by}), not the one in use ({fingerprint}); re-run "
                "`biolit-id embed` with the same --model"
            )


def read_table(path: Path, required: Sequence[str], what: str):
    """The parquet table at ``path``, refused with a ``DatasetError`` that says why."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} file {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DatasetError(f"{path} is not a readable parquet file: {exc}") from None
    missing = set(required) - set(table.column_names)
    if missing:
        raise DatasetError(f"{path} lacks column(s) {sorted(missing)}")
    return table


def embedding_rows(table, path: Path) -> np.ndarray:
    """The ``embedding`` column as an [N, D] float32 matrix; ragged vectors are refused."""
    column = table.column("embedding").combine_chunks()
    lengths = (set(column.value_lengths().to_numpy(zero_copy_only=False).tolist())
               if len(column) else set())
    if len(lengths) > 1:
        raise DatasetError(f"{path}: embeddings have different lengths {sorted(lengths)}")
    dim = int(lengths.pop()) if lengths else 0
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(len(column), dim)


def table_meta(table) -> dict:
    """What the writer recorded about the vectors (model, preprocessing); empty if nothing."""
    meta_raw = (table.schema.metadata or {}).get(META_KEY)
    return json.loads(meta_raw) if meta_raw else {}


def embedding_column(embeddings: np.ndarray):
    """[N, D] vectors as one parquet list<float32> column, a list per row."""
    import pyarrow as pa

    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    dim = emb.shape[1] if emb.ndim == 2 else 0
    values = pa.array(emb.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(len(emb) + 1) * dim, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, values)


def write_table(path: Path, columns: dict, meta: dict) -> Path:
    """``columns`` as parquet with ``meta`` in the schema, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    with atomic_open(path) as f:
        pq.write_table(table, f)
    return path


def write_embeddings(path: Path, data: EmbeddingSet) -> Path:
    import pyarrow as pa

    return write_table(path, {
        "species": pa.array(list(data.species), type=pa.string()),
        "embedding": embedding_column(data.embeddings),
        "image": pa.array([str(i) for i in data.images], type=pa.string()),
    }, data.meta)


def read_embeddings(path: Path) -> EmbeddingSet:
    table = read_table(path, ("species", "embedding"), "embeddings")
    emb = embedding_rows(table, path)
    images = (table.column("image").to_pylist() if "image" in table.column_names
              else [""] * len(emb))
    return EmbeddingSet([str(s) for s in table.column("species").to_pylist()], emb,
                        [str(i or "") for i in images], table_meta(table))


def stratified_split(
    species: Sequence[str], fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-species seeded shuffle into train/val/test row indices.

    Every species keeps at least one training row; a species with three rows
    or more also gets one validation and one test row, so rare species are
    evaluated at all (plain rounding would give them none).
    """
    _, f_val, f_test = fractions
    labels = np.asarray(species, dtype=object)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for name in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == name)
        rows = rows[rng.permutation(len(rows))]
        n = len(rows)
        n_val = int(np.floor(n * f_val + 0.5))
        n_test = int(np.floor(n * f_test + 0.5))
        if n >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        elif n == 2:
            n_val, n_test = 1, 0
        else:
            n_val, n_test = 0, 0
        n_train = n - n_val - n_test
        parts[0] += rows[:n_train].tolist()
        parts[1] += rows[n_train : n_train + n_val].tolist()
        parts[2] += rows[n_train + n_val :].tolist()
    return tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts)  # type: ignore[return-value]


def fingerprint(data: EmbeddingSet) -> str:
    """Order-independent digest of (species, embedding) rows: same data, same id."""
    emb = np.ascontiguousarray(data.embeddings, dtype=np.float32)
    rows = sorted(
        hashlib.sha256(name.encode("utf-8") + b"\0" + emb[i].tobytes()).digest()
        for i, name in enumerate(data.species)
    )
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row)
    return digest.hexdigest()[:16]
