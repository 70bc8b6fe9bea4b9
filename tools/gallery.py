"""``biolit-id gallery add|remove|list|import|add-species``: curate reference photos.

It talks to a RUNNING server over gRPC, because the server is the gallery's
only writer (its index and prototypes live in memory) and the RPCs are the
one validation path. ``export``/Parquet ``import`` live in
``gallery_migrate``, ``backup``/``restore`` in ``gallery_backup`` and
``rebuild`` in ``gallery_rebuild``: those open the files (or Milvus) without
a server. Manifest format and resumable import: docs/gallery.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from tqdm import tqdm

from biolit_id.cli.client.channel import auth_metadata, open_channel
from biolit_id.cli.maintenance.backup import add_backup_arguments, run_backup_command
from biolit_id.cli.maintenance.rebuild import add_rebuild_arguments, run_rebuild
from biolit_id.index.core.exemplar import META_FIELDS, ExemplarMeta
from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc

# Failures that concern one row; anything else (server down...) stops the import.
ROW_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
OPTIONAL_COLUMNS = META_FIELDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    parser.add_argument("--api-key", help="a 'curate' key, sent as 'authorization: Bearer KEY'")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate for a TLS server")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    sub = parser.add_subparsers(dest="gallery_command", metavar="SUBCOMMAND", required=True)

    add = sub.add_parser("add", help="add photos of one species")
    add.add_argument("--species", required=True, help="scientific name")
    add.add_argument("photos", nargs="+", type=Path)
    add.add_argument("--license", default="")
    add.add_argument("--contributor", default="")
    add.add_argument("--observation-id", default="")

    remove = sub.add_parser("remove", help="remove exemplars by id")
    remove.add_argument("ids", nargs="+", type=int)

    listing = sub.add_parser("list", help="list exemplars")
    listing.add_argument("--species", default="")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--limit", type=int, default=0, help="stop after N (0 = all)")

    imp = sub.add_parser("import", help="bulk-add photos from a CSV manifest (resumable), "
                                         "or an export .parquet into Milvus")
    imp.add_argument("manifest", type=Path, help="MANIFEST.csv, or OUT.parquet from export")
    imp.add_argument("--batch-size", type=int, default=16)
    imp.add_argument("--no-progress", action="store_true")
    from biolit_id.cli.maintenance.migrate import add_migrate_arguments

    add_migrate_arguments(sub, imp)  # `gallery export`, and `import X.parquet`'s options
    add_backup_arguments(sub)  # `gallery backup` / `gallery restore`: files, no server call
    add_rebuild_arguments(sub)  # `gallery rebuild`: refine and re-index, no server call

    species = sub.add_parser("add-species", help="add a species unknown to the catalog")
    species.add_argument("name", help="scientific name")
    species.add_argument("--vernacular", action="append", default=[], metavar="LANG:NAME",
                         help="e.g. fr:'Crabe vert' (repeatable)")
    species.add_argument("--description", default="")
    species.add_argument("--taxon", action="append", default=[], metavar="RANK=NAME",
                         help="e.g. genus=Carcinus family=Carcinidae (repeatable)")


@dataclass
class Client:
    stub: pb_grpc.SpeciesIdentifierStub
    metadata: list[tuple[str, str]]
    timeout: float

    def call(self, method: str, request, **kw):
        return getattr(self.stub, method)(request, timeout=self.timeout,
                                          metadata=self.metadata, **kw)


def run(args: argparse.Namespace) -> int:
    from biolit_id.cli.maintenance.migrate import run_migration, wants_migration

    if wants_migration(args):  # export / import of a .parquet: no server involved
        return run_migration(args)
    if args.gallery_command in ("backup", "restore"):
        return run_backup_command(args)
    if args.gallery_command == "rebuild":
        return run_rebuild(args)
    metadata = auth_metadata(args.api_key)
    with open_channel(args.server, args.tls_ca) as channel:
        client = Client(pb_grpc.SpeciesIdentifierStub(channel), metadata, args.timeout)
        command = {
            "add": cmd_add,
            "remove": cmd_remove,
            "list": cmd_list,
            "import": cmd_import,
            "add-species": cmd_add_species,
        }[args.gallery_command]
        try:
            return command(client, args)
        except grpc.RpcError as exc:
            print(f"biolit-id gallery {args.gallery_command}: {exc.code().name}: "
                  f"{exc.details()}", file=sys.stderr)
            return 1


# ----------------------------------------------------------------------- add


def cmd_add(client: Client, args: argparse.Namespace) -> int:
    for photo in args.photos:
        if not photo.is_file():
            print(f"{photo}: no such file", file=sys.stderr)
            return 1
    requests = (
        pb.AddExemplarRequest(
            species=args.species, image=photo.read_bytes(),
            **ExemplarMeta(source_uri=str(photo), license=args.license,
                           contributor=args.contributor,
                           observation_id=args.observation_id).meta_dict(),
        )
        for photo in args.photos
    )
    resp = client.call("AddExemplars", requests)
    for photo, exemplar_id in zip(args.photos, resp.exemplar_ids, strict=True):
        print(f"{photo}\t{exemplar_id}")
    print(f"gallery version {resp.gallery_version}; prototypes updated: "
          f"{', '.join(resp.species_updated) or 'none (all photos were already stored)'}")
    return 0


def cmd_remove(client: Client, args: argparse.Namespace) -> int:
    resp = client.call("RemoveExemplars", pb.RemoveExemplarsRequest(exemplar_ids=args.ids))
    print(f"removed {resp.removed_count}; prototypes updated: "
          f"{', '.join(resp.species_updated)}; gallery version {resp.gallery_version}")
    return 0


# ---------------------------------------------------------------------- list


def iter_exemplars(client: Client, species: str = "",
                   page_size: int = 1000) -> Iterator[pb.Exemplar]:
    token = ""
    while True:
        resp = client.call("ListExemplars", pb.ListExemplarsRequest(
            species=species, page_size=page_size, page_token=token))
        yield from resp.exemplars
        token = resp.next_page_token
        if not token:
            return


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    if not args.json:
        print("id\tspecies\tadded_at\tsha256\tsource_uri")
    for count, ex in enumerate(iter_exemplars(client, args.species), start=1):
        added = dt.datetime.fromtimestamp(ex.added_at.seconds, dt.timezone.utc)
        if args.json:
            print(json.dumps({
                "exemplar_id": ex.exemplar_id, "species": ex.species,
                **ExemplarMeta.of(ex).meta_dict(),
                "added_at": added.isoformat(), "content_sha256": ex.content_sha256,
            }, ensure_ascii=False))
        else:
            print(f"{ex.exemplar_id}\t{ex.species}\t{added:%Y-%m-%d %H:%M}\t"
                  f"{ex.content_sha256[:12]}\t{ex.source_uri}")
        if args.limit and count >= args.limit:
            break
    return 0


# -------------------------------------------------------------- add-species


def cmd_add_species(client: Client, args: argparse.Namespace) -> int:
    ranks = {"kingdom": pb.RANK_KINGDOM, "phylum": pb.RANK_PHYLUM, "class": pb.RANK_CLASS,
             "order": pb.RANK_ORDER, "family": pb.RANK_FAMILY, "genus": pb.RANK_GENUS}
    lineage = []
    for item in args.taxon:
        rank, _, name = item.partition("=")
        if rank not in ranks or not name:
            print(f"--taxon {item!r}: expected RANK=NAME with RANK in {', '.join(ranks)}",
                  file=sys.stderr)
            return 2
        lineage.append(pb.Taxon(rank=ranks[rank], name=name))
    vernacular = []
    for item in args.vernacular:
        lang, _, name = item.partition(":")
        if not name:
            print(f"--vernacular {item!r}: expected LANG:NAME", file=sys.stderr)
            return 2
        vernacular.append(pb.VernacularName(language=lang, name=name))
    species = client.call("AddSpecies", pb.AddSpeciesRequest(
        scientific_name=args.name, vernacular_names=vernacular, description=args.description,
        taxonomy=pb.Taxonomy(lineage=lineage)))
    print(f"added {species.scientific_name} "
          f"({' > '.join(t.name for t in species.taxonomy.lineage)})")
    return 0


# -------------------------------------------------------------------- import


@dataclass
class ManifestRow:
    line: int
    path: Path
    species: str
    fields: dict[str, str]


def read_manifest(path: Path) -> list[ManifestRow]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        path_column = next((c for c in ("path", "image", "file") if c in columns), None)
        if path_column is None or "species" not in columns:
            raise ValueError(f"{path}: needs a 'path' and a 'species' column, has "
                             f"{sorted(columns)}")
        rows = []
        for line, record in enumerate(reader, start=2):
            photo = Path(record[path_column].strip())
            if not photo.is_absolute():
                photo = path.parent / photo
            rows.append(ManifestRow(
                line=line, path=photo, species=record["species"].strip(),
                fields={c: (record.get(c) or "").strip() for c in OPTIONAL_COLUMNS},
            ))
    return rows


@dataclass
class ImportReport:
    added: int = 0
    skipped: int = 0
    failed: int = 0


def cmd_import(client: Client, args: argparse.Namespace) -> int:
    try:
        rows = read_manifest(args.manifest)
    except (OSError, ValueError) as exc:
        print(f"biolit-id gallery import: {exc}", file=sys.stderr)
        return 2
    stored = {(ex.species, ex.content_sha256) for ex in iter_exemplars(client)}
    failures: list[tuple[ManifestRow, str]] = []
    report = ImportReport()
    batch: list[tuple[ManifestRow, pb.AddExemplarRequest]] = []
    bar = tqdm(total=len(rows), unit="photo", desc="import", disable=args.no_progress)

    def flush() -> None:
        if batch:
            send_batch(client, batch, report, failures)
            bar.update(len(batch))
            bar.set_postfix(added=report.added, skipped=report.skipped, failed=report.failed)
            batch.clear()

    try:
        for row in rows:
            try:
                data = row.path.read_bytes()
            except OSError as exc:
                failures.append((row, f"cannot read: {exc.strerror or exc}"))
                report.failed += 1
                bar.update(1)
                continue
            key = (row.species, hashlib.sha256(data).hexdigest())
            if key in stored:  # stored before, or listed twice in the manifest
                report.skipped += 1
                bar.update(1)
                continue
            stored.add(key)
            fields = {k: v for k, v in row.fields.items() if v}
            fields.setdefault("source_uri", str(row.path))
            batch.append((row, pb.AddExemplarRequest(species=row.species, image=data,
                                                     **fields)))
            if len(batch) >= args.batch_size:
                flush()
        flush()
    finally:
        bar.close()
    if failures:
        failed_path = args.manifest.with_suffix(".failed.csv")
        with open(failed_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["line", "path", "species", "error"])
            for row, error in sorted(failures, key=lambda f: f[0].line):
                writer.writerow([row.line, str(row.path), row.species, error])
        print(f"{len(failures)} rows failed: see {failed_path}", file=sys.stderr)
    print(f"added {report.added}, already stored {report.skipped}, failed {report.failed}")
    return 1 if failures else 0


def send_batch(client: Client, batch: list[tuple[ManifestRow, pb.AddExemplarRequest]],
               report: ImportReport, failures: list[tuple[ManifestRow, str]]) -> None:
    """One stream for the batch; if a row fails, re-send row by row to isolate it.

    Rows before the failing one are already stored; re-sending them returns
    their ids without storing anything twice (the server is idempotent).
    """
    try:
        client.call("AddExemplars", iter([req for _, req in batch]))
        report.added += len(batch)
        return
    except grpc.RpcError as exc:
        if exc.code() not in ROW_ERRORS:
            raise
    for row, request in batch:
        try:
            client.call("AddExemplars", iter([request]))
            report.added += 1
        except grpc.RpcError as exc:
            if exc.code() not in ROW_ERRORS:
                raise
            failures.append((row, f"{exc.code().name}: {exc.details()}"))
            report.failed += 1
