"""The catalog a service runs with: the shipped default plus an overlay in data_dir.

What ``enrich`` and ``AddSpecies`` learn must survive restarts without editing
package data, so it lives in ``data_dir/catalog.json``, upserted under a file
lock and replaced atomically. Rules and versioning: docs/taxonomy.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from biolit_id.index.core.atomic import atomic_open
from biolit_id.server.catalog.catalog import Catalog, SpeciesRecord

log = logging.getLogger(__name__)

OVERLAY_FILE = "catalog.json"
FORMAT = "biolit-id-catalog-overlay/1"


class CatalogStoreError(ValueError):
    """The overlay cannot be used; the message names the file and the fix."""


def overlay_path(data_dir: Path) -> Path:
    return Path(data_dir) / OVERLAY_FILE


def read_overlay(data_dir: Path) -> dict[str, SpeciesRecord]:
    """Overlay records by name (empty when there is no overlay yet)."""
    path = overlay_path(data_dir)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
        if data.get("format") != FORMAT:
            raise CatalogStoreError(f"{path}: unknown format {data.get('format')!r}")
        records = [SpeciesRecord.from_json(s) for s in data.get("species", [])]
    except CatalogStoreError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CatalogStoreError(
            f"{path} is unreadable ({exc}); fix it, or move it away to serve the shipped "
            "catalog and re-run `biolit-id enrich`"
        ) from None
    return {r.scientific_name: r for r in records}


def load_catalog(data_dir: Path, base: Catalog | None = None) -> Catalog:
    """The shipped catalog with the overlay applied (what the server starts with)."""
    base = base or Catalog.load_default()
    overlay = read_overlay(data_dir)
    if not overlay:
        return base
    records = [overlay.pop(r.scientific_name, r) for r in base]
    records.extend(overlay.values())  # names the shipped catalog lacks, in overlay order
    return Catalog(records, version=f"{base.version}+{_digest(records)}")


def save_records(data_dir: Path, records: Iterable[SpeciesRecord],
                 base_version: str | None = None) -> Path:
    """Upsert records into the overlay, atomically, under the overlay's lock."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = overlay_path(data_dir)
    with _locked(data_dir):
        current = read_overlay(data_dir)
        for record in records:
            current[record.scientific_name] = record
        payload = {
            "format": FORMAT,
            "base_catalog_version": base_version or Catalog.load_default().version,
            "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "species": [r.to_json() for r in current.values()],
        }
        with atomic_open(path, "w") as f:
            json.dump(payload, f, indent=1, ensure_ascii=False)
    return path


def _digest(records: list[SpeciesRecord]) -> str:
    text = json.dumps([r.to_json() for r in records], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """An exclusive lock across processes (the server and an enrich run)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic replace still holds, only upserts may race
        yield
        return
    with open(Path(data_dir) / f"{OVERLAY_FILE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
