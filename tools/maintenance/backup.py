"""``biolit-id gallery backup|restore``: a consistent copy of a FAISS gallery, online.

``backup`` copies the SQLite store with SQLite's online backup API in one
step: it reads one snapshot of the database (WAL readers never block the
server's writer), so the copy is the store exactly as it was at one commit,
while adds keep arriving. The copy is made self-contained (no WAL), checked
(``quick_check``), fsynced and renamed into place, with ``backup.json``
(version, counts, model, SHA-256). Only the source of truth is copied, plus
the catalog overlay; the FAISS snapshot and the caches are rebuilt at start.

``restore`` needs the service stopped (it takes the store's lock exclusive):
it checks the backup's digest, removes the old WAL and the derived snapshot,
and puts the copy in place atomically. Milvus galleries: docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path

from biolit_id.index.core.atomic import atomic_path, atomic_write
from biolit_id.index.core.digest import file_sha256
from biolit_id.index.faiss.gallery import SNAPSHOT_FILE, STORE_FILE
from biolit_id.index.store import StoreError, lock_store
from biolit_id.server.catalog.store import OVERLAY_FILE

FORMAT = "biolit-gallery-backup/1"
GALLERY_DIR = "gallery"  # under --data-dir, as index.gallery opens it
MANIFEST = "backup.json"


class BackupError(RuntimeError):
    """A backup that cannot be taken or restored; the message says why."""


def add_backup_arguments(sub) -> None:
    backup = sub.add_parser("backup", help="copy the gallery store while the service runs "
                                           "(SQLite online backup)")
    backup.add_argument("--data-dir", type=Path, required=True, help="the server's --data-dir")
    backup.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                        help="folder to write the backup into")
    restore = sub.add_parser("restore", help="put a backup back (the service must be stopped)")
    restore.add_argument("--data-dir", type=Path, required=True, help="the server's --data-dir")
    restore.add_argument("in_dir", metavar="IN_DIR", type=Path,
                         help="a folder written by `gallery backup`")


def run_backup_command(args: argparse.Namespace) -> int:
    try:
        if args.gallery_command == "backup":
            info = backup(args.data_dir, args.out_dir)
            print(f"backed up {info['exemplars']} exemplars, {info['runtime_species']} runtime "
                  f"species (store version {info['version']}) to {args.out_dir}")
        else:
            info = restore(args.data_dir, args.in_dir)
            print(f"restored {info['exemplars']} exemplars (store version {info['version']}) "
                  f"into {args.data_dir}; the index is rebuilt at the next start")
        return 0
    except (BackupError, StoreError, OSError, sqlite3.Error) as exc:
        print(f"biolit-id gallery {args.gallery_command}: {exc}", file=sys.stderr)
        return 1


def backup(data_dir: Path, out_dir: Path) -> dict:
    """Copy ``data_dir``'s store into ``out_dir``; returns what ``backup.json`` records."""
    source = Path(data_dir) / GALLERY_DIR / STORE_FILE
    if not source.is_file():
        raise BackupError(f"no gallery store at {source}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / STORE_FILE
    started = time.time()
    with atomic_path(target) as tmp:
        src = sqlite3.connect(source, timeout=30.0)
        src.execute("PRAGMA query_only=ON")
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)  # pages=-1: the whole database from one read snapshot
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            _check(dst, target)
            info = _describe(dst)
        finally:
            dst.close()
            src.close()
    overlay = Path(data_dir) / OVERLAY_FILE
    if overlay.is_file():
        atomic_write(out_dir / OVERLAY_FILE, overlay.read_bytes())
    info.update(format=FORMAT, source=str(source), taken_at=started,
                seconds=round(time.time() - started, 3), sha256=file_sha256(target),
                overlay=overlay.is_file())
    atomic_write(out_dir / MANIFEST, json.dumps(info, indent=2))
    return info


def restore(data_dir: Path, in_dir: Path) -> dict:
    """Replace ``data_dir``'s store with the backup in ``in_dir`` (service stopped)."""
    in_dir = Path(in_dir)
    try:
        info = json.loads((in_dir / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise BackupError(f"{in_dir / MANIFEST} is missing or unreadable ({exc})") from None
    if info.get("format") != FORMAT:
        raise BackupError(f"{in_dir} holds format {info.get('format')!r}, not {FORMAT}")
    copy = in_dir / STORE_FILE
    if file_sha256(copy) != info.get("sha256"):
        raise BackupError(f"{copy} does not match {MANIFEST} (SHA-256 differs): damaged copy")
    gallery = Path(data_dir) / GALLERY_DIR
    gallery.mkdir(parents=True, exist_ok=True)
    target = gallery / STORE_FILE
    lock = lock_store(target, exclusive=True)  # StoreError while a server has it open
    try:
        with atomic_path(target) as tmp:
            shutil.copyfile(copy, tmp)
            with sqlite3.connect(tmp) as conn:
                _check(conn, copy)
            # The old store's WAL would be replayed into the new file: it goes first.
            for suffix in ("-wal", "-shm"):
                target.with_name(target.name + suffix).unlink(missing_ok=True)
        (gallery / SNAPSHOT_FILE).unlink(missing_ok=True)  # derived; rebuilt at start
        if info.get("overlay") and (in_dir / OVERLAY_FILE).is_file():
            atomic_write(Path(data_dir) / OVERLAY_FILE, (in_dir / OVERLAY_FILE).read_bytes())
    finally:
        os.close(lock)
    return info


def _check(conn: sqlite3.Connection, name: Path) -> None:
    result = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
    if result != ["ok"]:
        raise BackupError(f"{name} fails SQLite's quick_check: {'; '.join(result)}")


def _describe(conn: sqlite3.Connection) -> dict:
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    version = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    return {
        "version": int(version[0]) if version else 0,
        "exemplars": conn.execute("SELECT count(*) FROM exemplars").fetchone()[0],
        "max_exemplar_id": conn.execute("SELECT coalesce(max(id), 0) FROM exemplars")
                               .fetchone()[0],
        "runtime_species": conn.execute("SELECT count(*) FROM species").fetchone()[0],
        "model_fingerprint": meta.get("model_fingerprint", ""),
        "embedding_dim": int(meta.get("embedding_dim", 0)),
    }

