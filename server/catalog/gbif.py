"""Taxonomy and vernacular names from GBIF's species API, with an honest match record.

GBIF's answer is kept for what it is (exact, synonym, fuzzy, higher rank,
none) and never silently treated as exact, so curated ranks are only replaced
by exact matches. The HTTP side is ``gbif_http``. Policy: docs/taxonomy.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from biolit_id.server.catalog.catalog import GbifMatch, SpeciesRecord
from biolit_id.server.catalog.gbif_http import (  # re-exported: the client is part of this API
    DEFAULT_GBIF_URL,
    GbifClient,
    GbifError,
    GbifUnavailableError,
)

__all__ = [
    "DEFAULT_GBIF_URL", "GbifClient", "GbifError", "GbifLookup", "GbifUnavailableError",
    "apply_lookup", "client_for", "lookup_for_config", "lookup_species",
]

CACHE_DIRNAME = "gbif-cache"
LOOKUP_BUDGET_S = 8.0  # one AddSpecies look-up (match, synonym, vernacular pages), all tries
REPLY_MARGIN_S = 0.25  # left of the call's deadline to send UNAVAILABLE back
# Ranks a GBIF match may fill, highest first; "species" is always the catalog's own name.
HIGHER_RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus")
_RANK_LEVEL = {r.upper(): i for i, r in enumerate(HIGHER_RANKS)}
SPECIES_LEVEL = len(HIGHER_RANKS)  # SPECIES and everything below it
# GBIF writes ISO 639-2/3 codes; the service speaks ISO 639-1 (proto VernacularName).
ISO639_3_TO_1 = {
    "fra": "fr", "fre": "fr", "eng": "en", "deu": "de", "ger": "de", "spa": "es",
    "ita": "it", "nld": "nl", "dut": "nl", "por": "pt", "bre": "br", "cat": "ca",
    "eus": "eu", "baq": "eu", "cym": "cy", "wel": "cy", "gle": "ga", "oci": "oc",
}
DEFAULT_LANGUAGES = ("fr", "en")


# ----------------------------------------------------------------- look-up


@dataclass(frozen=True)
class GbifLookup:
    """What GBIF says about one name, already filtered by the match policy."""

    taxonomy: dict[str, str]  # only ranks in HIGHER_RANKS that GBIF returned
    vernacular: dict[str, list[str]]  # ISO 639-1 -> names, GBIF order, deduplicated
    match: GbifMatch
    authorship: str = ""
    matched_rank: str = ""  # GBIF's rank of the usage it matched (SPECIES, GENUS...)
    confidence: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def trusted(self) -> bool:
        """Only an exact match may overwrite curated data."""
        return self.match.match_type == "EXACT"


def lookup_species(
    client: GbifClient,
    name: str,
    kingdom: str | None = None,
    languages: Sequence[str] = DEFAULT_LANGUAGES,
    deadline: float | None = None,
) -> GbifLookup:
    """Match ``name`` on GBIF's backbone and collect its taxonomy and vernacular names.

    Raises GbifUnavailableError when GBIF cannot be reached (the caller keeps
    what it had), also when ``deadline`` (monotonic) leaves no time for another
    request; GbifError when GBIF answers nonsense.
    """
    m = client.match(name, kingdom=kingdom, deadline=deadline)
    match_type = str(m.get("matchType") or "NONE").upper()
    if match_type == "NONE" or not m.get("usageKey"):
        return GbifLookup({}, {}, GbifMatch(match_type="NONE"), notes=_notes(m))
    usage_key = int(m["usageKey"])
    status = str(m.get("status") or "").upper()
    rank = str(m.get("rank") or "").upper()
    level = _RANK_LEVEL.get(rank, SPECIES_LEVEL)
    if match_type == "HIGHERRANK":  # GBIF's rank is above what was asked for, by definition
        level = min(level, SPECIES_LEVEL - 1)
    source = m
    taxon_key = usage_key
    accepted_name = ""
    if status == "SYNONYM" or m.get("synonym") is True:
        status = "SYNONYM"
        accepted_key = m.get("acceptedUsageKey") or m.get("speciesKey")
        if accepted_key:
            source = client.usage(int(accepted_key), deadline)
            taxon_key = int(accepted_key)
            level = _RANK_LEVEL.get(str(source.get("rank") or "").upper(), level)
        accepted_name = str(
            source.get("canonicalName") or m.get("accepted") or m.get("species") or ""
        )
    elif match_type == "FUZZY":
        matched = str(m.get("canonicalName") or "")
        accepted_name = matched if matched and matched != name else ""
    taxonomy = {
        r: str(source[r]) for r in HIGHER_RANKS if source.get(r) and _RANK_LEVEL[r.upper()] <= level
    }
    vernacular: dict[str, list[str]] = {}
    if level >= SPECIES_LEVEL and match_type in {"EXACT", "FUZZY"}:
        vernacular = _vernacular(client.vernacular_names(taxon_key, deadline), languages)
    authorship = ""
    if match_type == "EXACT" and status != "SYNONYM":
        authorship = _authorship(m.get("scientificName"), m.get("canonicalName"))
    return GbifLookup(
        taxonomy=taxonomy,
        vernacular=vernacular,
        match=GbifMatch(match_type=match_type, status=status, usage_key=usage_key,
                        accepted_name=accepted_name),
        authorship=authorship,
        matched_rank=rank,
        confidence=int(m.get("confidence") or 0),
        notes=_notes(m),
    )


def apply_lookup(record: SpeciesRecord, lookup: GbifLookup) -> SpeciesRecord:
    """The record updated by a look-up, under the module's match policy.

    Exact matches replace the ranks GBIF returned; fuzzy and higher-rank
    matches only fill missing ranks; vernacular names are appended after the
    existing ones (the first English name is in the text prompt, so it stays).
    """
    taxonomy = dict(record.taxonomy)
    for rank, value in lookup.taxonomy.items():
        if lookup.trusted or not taxonomy.get(rank):
            taxonomy[rank] = value
    taxonomy["species"] = record.scientific_name
    vernacular = {k: list(v) for k, v in record.vernacular.items()}
    for lang, names in lookup.vernacular.items():
        if not lookup.trusted and vernacular.get(lang):
            continue
        vernacular[lang] = _merge_names(vernacular.get(lang, []), names)
    return replace(
        record,
        taxonomy=taxonomy,
        vernacular=vernacular,
        authorship=record.authorship or lookup.authorship,
        gbif=lookup.match,
    )


def _vernacular(results: Iterable[dict], languages: Sequence[str]) -> dict[str, list[str]]:
    wanted = set(languages)
    # GBIF flags a preferred name per source; those go first, otherwise GBIF order.
    ordered = sorted(results, key=lambda r: not r.get("preferred", False))
    out: dict[str, list[str]] = {}
    for item in ordered:
        code = str(item.get("language") or "").lower()
        lang = ISO639_3_TO_1.get(code, code if len(code) == 2 else "")
        name = " ".join(str(item.get("vernacularName") or "").split())
        if lang in wanted and name:
            out[lang] = _merge_names(out.get(lang, []), [name])
    return out


def _merge_names(existing: list[str], new: Iterable[str]) -> list[str]:
    seen = {n.casefold() for n in existing}
    merged = list(existing)
    for name in new:
        if name.casefold() not in seen:
            seen.add(name.casefold())
            merged.append(name)
    return merged


def _authorship(scientific: object, canonical: object) -> str:
    scientific, canonical = str(scientific or ""), str(canonical or "")
    if canonical and scientific.startswith(canonical):
        return scientific[len(canonical):].strip()
    return ""


def _notes(m: dict) -> list[str]:
    note = m.get("note")
    return [str(note)] if note else []


# ------------------------------------------------------------- server side

_clients: dict[tuple[str, str], GbifClient] = {}
_clients_lock = threading.Lock()


def client_for(gbif_url: str | None, data_dir: Path) -> GbifClient | None:
    """The server's shared client (None without ``--gbif-url``).

    Short timeout and few retries: a look-up runs inside an AddSpecies call,
    and a curator would rather get UNAVAILABLE in seconds than wait a minute.
    """
    if not gbif_url:
        return None
    key = (gbif_url, str(Path(data_dir).resolve()))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = GbifClient(gbif_url, cache_dir=Path(data_dir) / CACHE_DIRNAME,
                                timeout=5.0, retries=2, backoff=0.5, max_backoff=2.0)
            _clients[key] = client
        return client


def lookup_for_config(config, name: str, deadline: float | None = None) -> GbifLookup | None:
    """What ``AddSpecies`` calls when a request has no taxonomy.

    None when the server has no GBIF URL. Raises GbifUnavailableError (UNAVAILABLE)
    or GbifError (FAILED_PRECONDITION). ``deadline`` is the gRPC call's (monotonic):
    the look-up gives up ``REPLY_MARGIN_S`` before it, so the curator reads
    UNAVAILABLE rather than DEADLINE_EXCEEDED, and within ``LOOKUP_BUDGET_S``
    when the call has no deadline.
    """
    client = client_for(getattr(config, "gbif_url", None), config.data_dir)
    if client is None:
        return None
    budget = time.monotonic() + LOOKUP_BUDGET_S
    deadline = budget if deadline is None else min(budget, deadline - REPLY_MARGIN_S)
    return lookup_species(client, name, deadline=deadline)
