"""Taxonomy and vernacular names from GBIF's species API, with an honest match record.

A small client of our own on ``urllib`` rather than pygbif, because:

* the base URL must be configurable (``--gbif-url``: a mirror, a proxy, or the
  local fake server the tests run); pygbif hard-codes ``api.gbif.org``;
* every call needs an explicit timeout and bounded retries with exponential
  backoff on 429, 5xx and connection errors, honouring ``Retry-After``;
  pygbif leaves both to ``requests`` defaults (no retry, no timeout), which
  hangs a gRPC worker or a bulk run when GBIF is slow;
* responses are cached on disk under ``data_dir/gbif-cache`` keyed by URL, so a
  re-run of ``enrich`` or a restart costs no network, and a stale entry still
  answers when GBIF is unreachable;
* two endpoints (``/species/match``, ``/species/{key}/vernacularNames``, plus
  ``/species/{key}`` to follow a synonym) do not justify a dependency.

Match policy (GBIF's ``matchType`` and ``status``, never silently exact):

* ``EXACT`` + ``ACCEPTED``/``DOUBTFUL``: taxonomy (kingdom..genus) and fr/en
  vernacular names are trusted and may replace the catalog's.
* ``SYNONYM`` status: the taxonomy and vernacular names are those of the
  accepted usage (``acceptedUsageKey``, fetched), but the record keeps the
  user's name; ``status=SYNONYM`` and ``accepted_name`` say so.
* ``FUZZY``: recorded as FUZZY with the name GBIF matched in
  ``accepted_name``; its ranks only fill ranks the record lacks, never replace
  curated ones.
* ``HIGHERRANK``: only the ranks GBIF actually returned (e.g. kingdom..genus)
  are kept; nothing at species level is invented and no vernacular names are
  taken (the genus' "limpets" is not the species' name).
* ``NONE``: no taxonomy at all is stored; the name is kept as given, with
  ``match_type=NONE`` recorded (stored, not refused: a regional species GBIF
  does not know yet is still useful to a curator).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from pathlib import Path

from biolit_id.server.catalog import GbifMatch, SpeciesRecord

log = logging.getLogger(__name__)

DEFAULT_GBIF_URL = "https://api.gbif.org/v1"
CACHE_DIRNAME = "gbif-cache"
USER_AGENT = "biolit-id/0.1 (+https://www.biolit.fr)"
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
MAX_VERNACULAR_PAGES = 10
VERNACULAR_PAGE_SIZE = 100


class GbifError(RuntimeError):
    """GBIF answered, but not with something usable (4xx, bad JSON)."""


class GbifUnavailableError(GbifError):
    """GBIF could not be reached (refused, timed out, 429/5xx) after all retries."""


class GbifClient:
    """GET JSON from GBIF's v1 API with timeout, bounded retries and a disk cache.

    Thread-safe: no state changes per call except cache files, which are
    written atomically (tmp + rename), and the ``offline`` switch.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_GBIF_URL,
        cache_dir: Path | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_age_s: float = 30 * 86400,
    ) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in {"http", "https"} or not parsed.netloc:
            raise ValueError(f"GBIF URL must be http(s)://HOST[/PATH], got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_age_s = max_age_s
        # Cache-only mode: set by bulk callers after GBIF proved unreachable, so
        # the remaining names cost no more timeouts.
        self.offline = False
        self.requests_made = 0
        self._count_lock = threading.Lock()

    # ------------------------------------------------------------ endpoints

    def match(self, name: str, kingdom: str | None = None, strict: bool = False) -> dict:
        """``/species/match``: the backbone's best usage for a scientific name."""
        params = {"name": name, "verbose": "false"}
        if kingdom:  # disambiguates homonyms across kingdoms (plants vs animals)
            params["kingdom"] = kingdom
        if strict:
            params["strict"] = "true"
        return self.get_json("/species/match", params)

    def usage(self, key: int) -> dict:
        """``/species/{key}``: one name usage (used to follow a synonym)."""
        return self.get_json(f"/species/{int(key)}", {})

    def vernacular_names(self, key: int) -> list[dict]:
        """Every ``/species/{key}/vernacularNames`` result, following pages."""
        results: list[dict] = []
        offset = 0
        for _ in range(MAX_VERNACULAR_PAGES):
            page = self.get_json(
                f"/species/{int(key)}/vernacularNames",
                {"offset": str(offset), "limit": str(VERNACULAR_PAGE_SIZE)},
            )
            batch = page.get("results") or []
            results.extend(batch)
            if page.get("endOfRecords", True) or not batch:
                break
            offset += len(batch)
        return results

    # ------------------------------------------------------------ transport

    def url_for(self, path: str, params: dict[str, str]) -> str:
        query = urllib.parse.urlencode(sorted(params.items()))
        return f"{self.base_url}{path}" + (f"?{query}" if query else "")

    def get_json(self, path: str, params: dict[str, str]) -> dict:
        url = self.url_for(path, params)
        cached = self._cache_read(url)
        if cached is not None and (time.time() - cached[0]) <= self.max_age_s:
            return cached[1]
        if self.offline:
            if cached is not None:
                return cached[1]
            raise GbifUnavailableError(f"GBIF offline (cache-only) and {url} is not cached")
        try:
            body = self._fetch(url)
        except GbifUnavailableError:
            if cached is not None:  # stale-if-error: an old answer beats none
                log.warning("GBIF unreachable; using cached answer from %s for %s",
                            time.strftime("%Y-%m-%d", time.localtime(cached[0])), url)
                return cached[1]
            raise
        self._cache_write(url, body)
        return body

    def _fetch(self, url: str) -> dict:
        request = urllib.request.Request(
            url, headers={"Accept": "application/json", "User-Agent": USER_AGENT}
        )
        last = ""
        attempts = self.retries + 1
        for attempt in range(attempts):
            retry_after: float | None = None
            with self._count_lock:
                self.requests_made += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                try:
                    data = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise GbifError(f"GBIF sent invalid JSON for {url}: {exc}") from None
                if not isinstance(data, dict):
                    raise GbifError(f"GBIF sent {type(data).__name__}, not an object, for {url}")
                return data
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:
                    raise GbifError(f"GBIF answered HTTP {exc.code} for {url}") from None
                last = f"HTTP {exc.code}"
                retry_after = _retry_after_seconds(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
            if attempt + 1 < attempts:
                time.sleep(self._delay(attempt, retry_after))
        raise GbifUnavailableError(
            f"GBIF at {self.base_url} unreachable after {attempts} attempt(s) ({last})"
        )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (thundering herds), capped; Retry-After wins."""
        if retry_after is not None:
            return min(self.max_backoff, retry_after)
        base = min(self.max_backoff, self.backoff * (2**attempt))
        return base * random.uniform(0.5, 1.0)

    # --------------------------------------------------------------- cache

    def _cache_path(self, url: str) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def _cache_read(self, url: str) -> tuple[float, dict] | None:
        path = self._cache_path(url)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text("utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # a damaged entry is just a miss; the next fetch rewrites it
        if entry.get("url") != url:
            return None
        return float(entry.get("fetched_at", 0.0)), entry["body"]

    def _cache_write(self, url: str, body: dict) -> None:
        path = self._cache_path(url)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        entry = {"url": url, "fetched_at": time.time(), "body": body}
        tmp.write_text(json.dumps(entry, ensure_ascii=False), "utf-8")
        os.replace(tmp, path)


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


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
) -> GbifLookup:
    """Match ``name`` on GBIF's backbone and collect its taxonomy and vernacular names.

    Raises GbifUnavailableError when GBIF cannot be reached (the caller keeps
    what it had); GbifError when GBIF answers nonsense.
    """
    m = client.match(name, kingdom=kingdom)
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
            source = client.usage(int(accepted_key))
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
        vernacular = _vernacular(client.vernacular_names(taxon_key), languages)
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


def lookup_for_config(config, name: str) -> GbifLookup | None:
    """What ``AddSpecies`` calls when a request has no taxonomy.

    None when the server has no GBIF URL. Raises GbifUnavailableError (map it
    to UNAVAILABLE) or GbifError (map it to FAILED_PRECONDITION / INTERNAL).
    """
    client = client_for(getattr(config, "gbif_url", None), config.data_dir)
    return None if client is None else lookup_species(client, name)
