"""``biolit-id embed``: a labelled photo set -> an embeddings parquet file.

Photos go through the service's own preprocessing and embedder, so training
sees the vectors serving will see. Embedding on a CPU is slow, so every
vector is cached by file hash and model settings and a rerun embeds only what
is new. docs/training.md.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biolit_id.cli.training.datasets import EmbeddingSet, errors_path, write_embeddings
from biolit_id.index.core.atomic import atomic_open
from biolit_id.server.inference.embedders.calibration import IMAGE_SUFFIXES
from biolit_id.server.inference.model_loader import DEFAULT_MODEL
from biolit_id.server.inference.preprocess import ImageDecodeError, ImagePolicy, preprocess

log = logging.getLogger(__name__)

FLUSH_EVERY = 512  # new vectors per cache part: a crash loses at most this many


@dataclass(frozen=True)
class Item:
    path: Path
    species: str


class ManifestError(ValueError):
    """The manifest or folder cannot be read; the message says why."""


def items_from_csv(path: Path) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        if not {"image", "species"} <= fields:
            raise ManifestError(
                f"{path}: needs columns 'image' and 'species', found {sorted(fields)}"
            )
        items = []
        for line, row in enumerate(reader, start=2):
            image, species = (row.get("image") or "").strip(), (row.get("species") or "").strip()
            if not image or not species:
                raise ManifestError(f"{path}:{line}: empty image or species")
            image_path = Path(image).expanduser()
            if not image_path.is_absolute():
                image_path = path.parent / image_path
            items.append(Item(image_path, species))
    return items


def items_from_folder(root: Path) -> list[Item]:
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"folder {root} does not exist")
    items = [
        Item(p, sub.name)
        for sub in sorted(d for d in root.iterdir() if d.is_dir())
        for p in sorted(sub.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise ManifestError(f"{root}: no photos found in species subfolders")
    return items


class EmbeddingCache:
    """content sha256 -> vector, in append-only parquet parts (crash-safe, resumable)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.vectors: dict[str, np.ndarray] = {}
        self._pending: dict[str, np.ndarray] = {}
        if self.directory.is_dir():
            import pyarrow.parquet as pq

            for part in sorted(self.directory.glob("part-*.parquet")):
                try:
                    table = pq.read_table(part)
                except Exception:  # a part torn by a crash: its vectors are recomputed
                    log.warning("ignoring unreadable cache part %s", part)
                    continue
                for key, vec in zip(table.column("sha256").to_pylist(),
                                    table.column("embedding").to_pylist(), strict=True):
                    self.vectors[key] = np.asarray(vec, dtype=np.float32)

    def get(self, key: str) -> np.ndarray | None:
        return self.vectors.get(key)

    def put(self, key: str, vector: np.ndarray) -> None:
        self.vectors[key] = vector
        self._pending[key] = vector
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.directory.mkdir(parents=True, exist_ok=True)
        keys = list(self._pending)
        table = pa.table({
            "sha256": pa.array(keys, type=pa.string()),
            "embedding": pa.array([self._pending[k].tolist() for k in keys],
                                  type=pa.list_(pa.float32())),
        })
        name = f"part-{time.time_ns():020d}.parquet"
        with atomic_open(self.directory / name) as f:
            pq.write_table(table, f)
        self._pending.clear()


def cache_key_space(fingerprint: str, policy: ImagePolicy, runtime: str = "torch",
                    precision: str = "fp32") -> str:
    """Vectors are only reusable for the same model, the same pixels and the same
    arithmetic (runtime and precision)."""
    pre = json.dumps([policy.image_size, policy.mean, policy.std, policy.fast_decode])
    digest = hashlib.sha256(pre.encode()).hexdigest()[:8]
    return f"{fingerprint}-{digest}-{runtime}-{precision}"


def embed_items(items: list[Item], embedder, policy: ImagePolicy, cache: EmbeddingCache,
                batch_size: int = 32, workers: int = 2, progress: bool = True) -> dict:
    """Embed ``items`` in manifest order; returns vectors, errors and counts."""
    from tqdm import tqdm

    vectors: list[np.ndarray | None] = [None] * len(items)
    errors: list[tuple[Item, str]] = []
    cached = embedded = 0
    bar = tqdm(total=len(items), desc="embedding", unit="photo", disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                # Decoding is skipped for photos already cached: hash first, cheap.
                loaded = list(pool.map(lambda it: _hash_or_load(it, policy, cache), chunk))
                todo_rows, todo_pixels, todo_keys = [], [], []
                for offset, (key, pixels, error, hit) in enumerate(loaded):
                    row = start + offset
                    if hit is not None:
                        vectors[row] = hit
                        cached += 1
                    elif error:
                        errors.append((items[row], error))
                    else:
                        todo_rows.append(row)
                        todo_pixels.append(pixels)
                        todo_keys.append(key)
                if todo_pixels:
                    out = embedder.embed(np.stack(todo_pixels))
                    for row, key, vec in zip(todo_rows, todo_keys, out, strict=True):
                        vec = np.asarray(vec, dtype=np.float32)
                        vectors[row] = vec
                        cache.put(key, vec)
                    embedded += len(todo_rows)
                bar.update(len(chunk))
                bar.set_postfix(cached=cached, errors=len(errors))
    finally:
        cache.flush()
        bar.close()
    return {"vectors": vectors, "errors": errors, "cached": cached, "embedded": embedded}


def _hash_or_load(item: Item, policy: ImagePolicy, cache: EmbeddingCache):
    try:
        data = item.path.read_bytes()
    except OSError as exc:
        return "", None, f"cannot read file: {exc.strerror or exc}", None
    key = hashlib.sha256(data).hexdigest()
    hit = cache.get(key)
    if hit is not None:
        return key, None, "", hit
    try:
        return key, preprocess(data, policy), "", None
    except ImageDecodeError as exc:
        return key, None, str(exc), None
    except Exception as exc:  # never fatal: a photo that crashes PIL is listed, not raised
        return key, None, f"{type(exc).__name__}: {exc}", None


def write_errors(path: Path, errors: list[tuple[Item, str]]) -> None:
    if not errors:
        path.unlink(missing_ok=True)
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "species", "error"])
        for item, message in errors:
            writer.writerow([str(item.path), item.species, message])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="CSV with columns image,species")
    source.add_argument("--folder", type=Path, help="folder with one subfolder per species")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model spec (hf-hub:… or local-dir:…)")
    parser.add_argument("--out", type=Path, required=True, help="embeddings parquet to write")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="vector cache (default: OUT's folder/.OUT-name.cache)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--runtime", default="torch")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=True,
                        help="the service's JPEG draft decoding (keep as the server runs)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from biolit_id.server.inference.embedders.factory import make_embedder
    from biolit_id.server.inference.model_loader import load_model

    try:
        items = items_from_csv(args.manifest) if args.manifest else items_from_folder(args.folder)
    except ManifestError as exc:
        log.error("%s", exc)
        return 2
    loaded = load_model(args.model)
    policy = ImagePolicy(image_size=loaded.image_size, mean=loaded.mean, std=loaded.std,
                         fast_decode=args.fast_decode)
    out = Path(args.out)
    cache_root = args.cache_dir or out.with_name(f".{out.name}.cache")
    embedder = make_embedder(loaded, args.runtime, args.precision)
    space = cache_key_space(loaded.fingerprint, policy, embedder.runtime, embedder.precision)
    cache = EmbeddingCache(Path(cache_root) / space)
    result = embed_items(items, embedder, policy, cache, args.batch_size, args.workers,
                         progress=not args.no_progress)
    keep = [i for i, v in enumerate(result["vectors"]) if v is not None]
    dim = loaded.embedding_dim
    data = EmbeddingSet(
        species=[items[i].species for i in keep],
        embeddings=(np.stack([result["vectors"][i] for i in keep]) if keep
                    else np.zeros((0, dim), np.float32)),
        images=[str(items[i].path) for i in keep],
        meta={
            "model_id": loaded.spec,
            "model_fingerprint": loaded.fingerprint,
            "embedding_dim": dim,
            "preprocessing": {"image_size": policy.image_size, "mean": list(policy.mean),
                              "std": list(policy.std), "resize": "squash",
                              "fast_decode": policy.fast_decode},
        },
    )
    write_embeddings(out, data)
    write_errors(errors_path(out), result["errors"])
    print(f"wrote {len(keep)} embeddings ({dim}-d) to {out}: {result['embedded']} embedded, "
          f"{result['cached']} from cache, {len(result['errors'])} unreadable"
          + (f" (listed in {errors_path(out)})" if result["errors"] else ""))
    return 0
