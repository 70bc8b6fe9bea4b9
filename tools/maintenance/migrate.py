"""``biolit-id gallery export OUT.parquet`` and ``gallery import OUT.parquet``: move a gallery.

Export reads a store directly (no server needed); import writes into Milvus
with the servers' model and bundle, keeping ids and recomputing the derived
prototypes, which is also how a gallery moves to a new bundle. Resumable.
docs/gallery.md ("Moving a gallery"), docs/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from biolit_id.index.core.atomic import atomic_open
from biolit_id.index.core.exemplar import META_FIELDS
from biolit_id.index.faiss.gallery import STORE_FILE
from biolit_id.index.milvus.collections import MilvusIndex
from biolit_id.index.milvus.errors import MilvusConfigError
from biolit_id.index.milvus.rows import EXEMPLAR_META_FIELDS
from biolit_id.index.milvus.schema import read_meta
from biolit_id.index.milvus.target import connect, parse_target
from biolit_id.index.milvus.thumbnail import decode_thumbnail
from biolit_id.index.store import GalleryStore

log = logging.getLogger(__name__)

EXPORT_KEY = b"biolit.gallery_export"
FORMAT_VERSION = 1
CHUNK = 1000
COLUMNS = ("id", "species", "embedding", "content_sha256", *META_FIELDS, "added_at",
           "thumbnail")


def add_migrate_arguments(sub, imp: argparse.ArgumentParser) -> None:
    """Register ``export`` and the export-file options of ``import`` on gallery_cli's parser."""
    from biolit_id.server.inference.model_loader import DEFAULT_MODEL

    exp = sub.add_parser("export", help="write every exemplar (embedding, metadata, thumbnail) "
                                        "to a Parquet file, for `gallery import`")
    exp.add_argument("out", type=Path, help="the .parquet file to write")
    exp.add_argument("--data-dir", type=Path, default=Path("./data"),
                     help="the FAISS gallery's data directory (default: %(default)s)")
    exp.add_argument("--gallery", default="faiss",
                     help="faiss (the --data-dir store) | milvus-lite:PATH | "
                          "milvus://HOST:PORT/NAME")
    exp.add_argument("--no-progress", action="store_true")
    group = imp.add_argument_group("importing an export file (.parquet) into Milvus")
    group.add_argument("--gallery", help="milvus-lite:PATH | milvus://HOST:PORT/NAME")
    group.add_argument("--model", default=DEFAULT_MODEL, help="the servers' model")
    group.add_argument("--bundle", type=Path, help="the servers' bundle (hybrid mode)")
    group.add_argument("--data-dir", type=Path, default=Path("./data"),
                       help="catalog overlay and text-prototype cache (default: %(default)s)")


def wants_migration(args: argparse.Namespace) -> bool:
    command = getattr(args, "gallery_command", "")
    return command == "export" or (
        command == "import" and str(getattr(args, "manifest", "")).endswith(".parquet"))


def run_migration(args: argparse.Namespace) -> int:
    from biolit_id.index.base import GalleryConfigError, GalleryError

    try:
        if args.gallery_command == "export":
            summary = export_gallery(args.out, args.gallery, args.data_dir,
                                     progress=not args.no_progress)
            print(f"exported {summary['rows']} exemplars of {summary['species']} species "
                  f"({summary['runtime_species']} runtime species) to {args.out}")
            return 0
        if not args.gallery or not args.gallery.startswith("milvus"):
            print("biolit-id gallery import: an export file goes into a Milvus gallery "
                  "(--gallery milvus-lite:PATH or milvus://HOST:PORT/NAME); a FAISS gallery "
                  "takes photos (gallery import MANIFEST.csv)", file=sys.stderr)
            return 2
        summary = import_export(args.manifest, args.gallery, args.model, args.bundle,
                                args.data_dir, progress=not args.no_progress)
        print(f"imported {summary['imported']} exemplars ({summary['skipped']} already there), "
              f"{summary['species']} species prototypes recomputed")
        return 0
    except (OSError, ValueError, GalleryConfigError, GalleryError) as exc:
        print(f"biolit-id gallery {args.gallery_command}: {exc}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------- export


def _faiss_rows(data_dir: Path) -> tuple[dict, Iterator[list[dict]], int]:
    path = Path(data_dir) / "gallery" / STORE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no FAISS gallery store at {path} (check --data-dir)")
    store = GalleryStore.open_existing(path)
    fingerprint, dim = store.model()
    header = {"model_fingerprint": fingerprint, "embedding_dim": dim,
              "runtime_species": store.runtime_species(), "source": f"faiss:{data_dir}"}

    def rows() -> Iterator[list[dict]]:
        try:
            for ids, raw in store.iter_embeddings(chunk=CHUNK):
                meta_rows = store.rows(ids.tolist(), with_thumbnails=True)
                yield [_export_row(meta_rows[int(i)], vec) for i, vec in zip(ids, raw,
                                                                              strict=True)
                       if int(i) in meta_rows]
        finally:
            store.close()

    return header, rows(), store.count()


def _export_row(row, raw) -> dict:
    return {"id": row.exemplar_id, "species": row.species, "embedding": raw,
            "content_sha256": row.content_sha256, **row.meta_dict(), "added_at": row.added_at,
            "thumbnail": row.thumbnail}


def _milvus_rows(gallery: str) -> tuple[dict, Iterator[list[dict]], int]:
    target = parse_target(gallery)
    client = connect(target)
    there = all(client.has_collection(c) for c in (target.collection,
                                                   target.species_collection))
    meta = read_meta(client, target.species_collection) if there else None
    if meta is None:
        raise MilvusConfigError(f"no gallery collection {target.collection} at {target.uri}")
    index = MilvusIndex(target, dim=meta["dim"], raw_dim=meta["raw_dim"], meta=meta,
                        client=client)
    runtime = [r.record_json for r in index.species_rows() if r.record_json]
    header = {"model_fingerprint": meta["model_fingerprint"],
              "embedding_dim": int(meta["raw_dim"]), "runtime_species": runtime,
              "source": target.describe()}
    fields = [*EXEMPLAR_META_FIELDS, "raw", "thumbnail"]

    def rows() -> Iterator[list[dict]]:
        try:
            for batch in index.iter_rows(fields, batch=CHUNK):
                yield [dict({k: r[k] for k in EXEMPLAR_META_FIELDS}, embedding=r["raw"],
                            thumbnail=decode_thumbnail(r["thumbnail"])) for r in batch]
        finally:
            index.close()

    return header, rows(), index.exemplar_count


def export_gallery(out: Path, gallery: str = "faiss", data_dir: Path = Path("./data"),
                   progress: bool = True) -> dict:
    """Write the gallery to ``out`` (atomically); returns a summary."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    backend = (gallery or "faiss").partition(":")[0]
    if backend == "faiss":
        header, batches, total = _faiss_rows(data_dir)
    else:
        header, batches, total = _milvus_rows(gallery)
    dim = header["embedding_dim"]
    schema = pa.schema([
        ("id", pa.int64()), ("species", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)), ("content_sha256", pa.string()),
        *((name, pa.string()) for name in META_FIELDS),
        ("added_at", pa.float64()), ("thumbnail", pa.binary()),
    ], metadata={EXPORT_KEY: json.dumps(dict(header, format=FORMAT_VERSION)).encode()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows_written = 0
    species: set[str] = set()
    with atomic_open(out) as sink, \
            pq.ParquetWriter(sink, schema, compression="zstd") as writer, \
            tqdm(total=total, unit="photo", desc="export", disable=not progress) as bar:
        for batch in batches:
            if not batch:
                continue
            columns = {c: [r[c] for r in batch] for c in COLUMNS if c != "embedding"}
            flat = np.asarray([r["embedding"] for r in batch], dtype=np.float32).reshape(-1)
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)
            writer.write_table(pa.table({c: columns[c] for c in COLUMNS}, schema=schema))
            rows_written += len(batch)
            species.update(columns["species"])
            bar.update(len(batch))
    return {"rows": rows_written, "species": len(species),
            "runtime_species": len(header["runtime_species"])}


# ---------------------------------------------------------------------- import


def read_export_header(path: Path) -> dict:
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).schema_arrow.metadata or {}
    if EXPORT_KEY not in metadata:
        raise ValueError(f"{path} is not a `biolit-id gallery export` file")
    header = json.loads(metadata[EXPORT_KEY])
    if header.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: export format {header.get('format')}, this build reads "
                         f"{FORMAT_VERSION}")
    return header


def import_export(path: Path, gallery: str, model_spec: str, bundle_path: Path | None,
                  data_dir: Path, progress: bool = True) -> dict:
    """Import an export file into a Milvus gallery; returns a summary."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from biolit_id.cli.maintenance.rebuild import open_offline_gallery
    from biolit_id.server.catalog.catalog import SpeciesRecord
    from biolit_id.server.inference.model_loader import load_model

    header = read_export_header(path)
    model = load_model(model_spec)
    if (header["model_fingerprint"], header["embedding_dim"]) != (model.fingerprint,
                                                                  model.embedding_dim):
        raise ValueError(
            f"{path} holds embeddings of model {header['model_fingerprint']} "
            f"({header['embedding_dim']}-d); --model is {model.fingerprint} "
            f"({model.embedding_dim}-d). Re-embed the photos instead (gallery import "
            "MANIFEST.csv against a server running the new model).")
    g = open_offline_gallery(gallery, model_spec, bundle_path, data_dir, model=model)
    imported = skipped = 0
    species: set[str] = set()
    try:
        for text in header["runtime_species"]:
            record = SpeciesRecord.from_json(json.loads(text))
            if not g.knows(record.scientific_name):
                g.add_species(record)
        parquet = pq.ParquetFile(path)
        with tqdm(total=parquet.metadata.num_rows, unit="photo", desc="import",
                  disable=not progress) as bar:
            for batch in parquet.iter_batches(batch_size=CHUNK):
                rows = batch.to_pylist()
                there = g.index.get([r["id"] for r in rows], ["id"])
                todo = [r for r in rows if int(r["id"]) not in there]
                imported += g.import_rows(todo)
                skipped += len(rows) - len(todo)
                species.update(r["species"] for r in rows)
                bar.update(len(rows))
        unknown = sorted(s for s in species if not g.knows(s))
        if unknown:
            log.warning("photos of %d species in neither catalog nor export's runtime species "
                        "(searchable, no prototype): %s", len(unknown), unknown[:10])
        known = sorted(s for s in species if g.knows(s))
        for name in tqdm(known, unit="species", desc="prototypes", disable=not progress):
            g.refresh([name])
    finally:
        g.close()
    return {"imported": imported, "skipped": skipped, "species": len(known)}
