"""``biolit-id enrich``: refresh catalog taxonomy and vernacular names from GBIF.

Writes the catalog overlay, never the shipped catalog, with the match policy
of ``server.catalog.gbif``. Offline it keeps existing data and says so. Exit codes: 0
all looked up, 2 unknown ``--species``, 3 some not looked up. docs/taxonomy.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from biolit_id.server.catalog.gbif import (
    CACHE_DIRNAME,
    DEFAULT_GBIF_URL,
    DEFAULT_LANGUAGES,
    GbifClient,
    GbifError,
    GbifUnavailableError,
    apply_lookup,
    lookup_species,
)
from biolit_id.server.catalog.store import CatalogStoreError, load_catalog, save_records

EXIT_OK = 0
EXIT_UNKNOWN_SPECIES = 2
EXIT_NOT_REFRESHED = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="the service's data directory (overlay and GBIF cache go here)")
    parser.add_argument("--species", nargs="+", metavar="NAME",
                        help="only these catalog species (default: all)")
    parser.add_argument("--gbif-url", default=DEFAULT_GBIF_URL,
                        help="GBIF API base URL (default: %(default)s)")
    parser.add_argument("--refresh", action="store_true",
                        help="ignore cached GBIF answers (they are kept 30 days otherwise)")
    parser.add_argument("--languages", default=",".join(DEFAULT_LANGUAGES),
                        help="vernacular name languages, ISO 639-1 (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries on 429/5xx/connection errors, with backoff")
    parser.add_argument("--dry-run", action="store_true",
                        help="look up and report, but write nothing")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    data_dir: Path = args.data_dir
    try:
        catalog = load_catalog(data_dir)
    except CatalogStoreError as exc:
        print(f"biolit-id enrich: {exc}", file=sys.stderr)
        return 1
    names = list(dict.fromkeys(args.species or catalog.names()))
    unknown = [n for n in names if n not in catalog]
    if unknown:
        print(f"biolit-id enrich: not in the catalog: {', '.join(unknown)} "
              "(add new species with AddSpecies)", file=sys.stderr)
        return EXIT_UNKNOWN_SPECIES
    try:
        client = GbifClient(
            args.gbif_url, cache_dir=data_dir / CACHE_DIRNAME, timeout=args.timeout,
            retries=args.retries, max_age_s=0.0 if args.refresh else 30 * 86400,
        )
    except ValueError as exc:
        print(f"biolit-id enrich: {exc}", file=sys.stderr)
        return 1
    languages = [x.strip() for x in args.languages.split(",") if x.strip()]

    updated = []
    by_match: Counter[str] = Counter()
    review: list[str] = []
    unreachable: list[str] = []
    failed: list[str] = []
    first_outage = ""
    for name in tqdm(names, desc="GBIF look-ups", unit="species", file=sys.stderr):
        record = catalog.get(name)
        try:
            lookup = lookup_species(client, name, kingdom=record.taxon_at("kingdom") or None,
                                    languages=languages)
        except GbifUnavailableError as exc:
            unreachable.append(name)
            if not client.offline:
                first_outage = str(exc)
                client.offline = True  # cache-only from here: no timeout per name
            continue
        except GbifError as exc:
            failed.append(f"{name}: {exc}")
            continue
        by_match[_label(lookup.match.match_type, lookup.match.status)] += 1
        if not lookup.trusted or lookup.match.status == "SYNONYM":
            review.append(_review_line(name, lookup))
        new = apply_lookup(record, lookup)
        if new != record:
            updated.append(new)

    print(f"looked up {sum(by_match.values())} of {len(names)} species on {args.gbif_url}: "
          + (", ".join(f"{k} {v}" for k, v in sorted(by_match.items())) or "none"))
    if review:
        print("to review (not exact, or synonyms):")
        for line in review:
            print(f"  {line}")
    if updated and not args.dry_run:
        path = save_records(data_dir, updated)
        print(f"updated {len(updated)} species in {path}")
    elif updated:
        print(f"dry run: {len(updated)} species would be updated, nothing written")
    else:
        print("no species changed" if not unreachable else "nothing written")
    if unreachable:
        print(f"WARNING: GBIF unreachable ({first_outage}); kept the existing taxonomy and "
              f"names of {len(unreachable)} species: {_short(unreachable)}", file=sys.stderr)
    for line in failed:
        print(f"WARNING: GBIF error, kept existing data: {line}", file=sys.stderr)
    return EXIT_NOT_REFRESHED if unreachable or failed else EXIT_OK


def _label(match_type: str, status: str) -> str:
    return f"{match_type}/{status}" if status and status != "ACCEPTED" else match_type


def _review_line(name: str, lookup) -> str:
    m = lookup.match
    detail = f"{_label(m.match_type, m.status)}"
    if m.accepted_name:
        detail += f" -> {m.accepted_name}"
    if lookup.matched_rank and m.match_type == "HIGHERRANK":
        detail += f" (only {lookup.matched_rank.lower()} known)"
    return f"{name}: {detail}"


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
