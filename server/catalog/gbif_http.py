"""GBIF's HTTP side: GET JSON with timeouts, urllib3 ``Retry`` and a disk cache.

``requests`` + urllib3's ``Retry`` do the retries (backoff with jitter on 429,
5xx and connection errors, ``Retry-After`` honoured); the subclass here only
adds what they lack: stop retrying when the caller's deadline (a gRPC call's)
leaves no room for another attempt, and count attempts. Answers are cached on
disk keyed by URL; a stale entry still answers when GBIF is unreachable.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from biolit_id.index.core.atomic import atomic_write

log = logging.getLogger(__name__)

DEFAULT_GBIF_URL = "https://api.gbif.org/v1"
USER_AGENT = "biolit-id/0.1 (+https://www.biolit.fr)"
RETRY_STATUSES = frozenset({429, *range(500, 600)})
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
        self.requests_made = 0  # HTTP attempts, retries included
        self._count_lock = threading.Lock()
        retry = _DeadlineRetry(
            total=self.retries, status_forcelist=RETRY_STATUSES, allowed_methods={"GET"},
            backoff_factor=backoff, backoff_max=max_backoff, backoff_jitter=backoff,
            respect_retry_after_header=True, raise_on_status=False,
        )
        self._session = requests.Session()  # connection pool, shared by threads (GET only)
        self._session.headers.update({"Accept": "application/json", "User-Agent": USER_AGENT})
        for scheme in ("http://", "https://"):
            self._session.mount(scheme, HTTPAdapter(max_retries=retry))

    # ------------------------------------------------------------ endpoints

    def match(self, name: str, kingdom: str | None = None, strict: bool = False,
              deadline: float | None = None) -> dict:
        """``/species/match``: the backbone's best usage for a scientific name."""
        params = {"name": name, "verbose": "false"}
        if kingdom:  # disambiguates homonyms across kingdoms (plants vs animals)
            params["kingdom"] = kingdom
        if strict:
            params["strict"] = "true"
        return self.get_json("/species/match", params, deadline)

    def usage(self, key: int, deadline: float | None = None) -> dict:
        """``/species/{key}``: one name usage (used to follow a synonym)."""
        return self.get_json(f"/species/{int(key)}", {}, deadline)

    def vernacular_names(self, key: int, deadline: float | None = None) -> list[dict]:
        """Every ``/species/{key}/vernacularNames`` result, following pages."""
        results: list[dict] = []
        offset = 0
        for _ in range(MAX_VERNACULAR_PAGES):
            page = self.get_json(
                f"/species/{int(key)}/vernacularNames",
                {"offset": str(offset), "limit": str(VERNACULAR_PAGE_SIZE)},
                deadline,
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

    def get_json(self, path: str, params: dict[str, str],
                 deadline: float | None = None) -> dict:
        """GBIF's answer (from the cache when fresh); ``deadline`` is a monotonic time
        by which to give up (a gRPC call's), None for the client's own limits."""
        url = self.url_for(path, params)
        cached = self._cache_read(url)
        if cached is not None and (time.time() - cached[0]) <= self.max_age_s:
            return cached[1]
        if self.offline:
            if cached is not None:
                return cached[1]
            raise GbifUnavailableError(f"GBIF offline (cache-only) and {url} is not cached")
        try:
            body = self._fetch(url, deadline)
        except GbifUnavailableError:
            if cached is not None:  # stale-if-error: an old answer beats none
                log.warning("GBIF unreachable; using cached answer from %s for %s",
                            time.strftime("%Y-%m-%d", time.localtime(cached[0])), url)
                return cached[1]
            raise
        self._cache_write(url, body)
        return body

    def _fetch(self, url: str, deadline: float | None) -> dict:
        timeout = self.timeout
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GbifUnavailableError(
                    f"GBIF at {self.base_url} too slow: no time left before the deadline")
            timeout = min(timeout, left)
        with _call(deadline, timeout) as call:
            try:
                response = self._session.get(url, timeout=timeout)
            except requests.RequestException as exc:
                raise GbifUnavailableError(
                    f"GBIF at {self.base_url} unreachable after {call.attempts} attempt(s) "
                    f"({_reason(exc)})"
                ) from None
            finally:
                with self._count_lock:
                    self.requests_made += call.attempts
        status = response.status_code
        if status in RETRY_STATUSES:  # still failing when the retries ran out
            raise GbifUnavailableError(
                f"GBIF at {self.base_url} unreachable after {call.attempts} attempt(s) "
                f"(HTTP {status})"
            )
        if status >= 400:
            raise GbifError(f"GBIF answered HTTP {status} for {url}")
        try:
            data = json.loads(response.content.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GbifError(f"GBIF sent invalid JSON for {url}: {exc}") from None
        if not isinstance(data, dict):
            raise GbifError(f"GBIF sent {type(data).__name__}, not an object, for {url}")
        return data

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
        entry = {"url": url, "fetched_at": time.time(), "body": body}
        atomic_write(path, json.dumps(entry, ensure_ascii=False))


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


@dataclass
class _Call:
    deadline: float | None
    attempt_s: float
    attempts: int = 1  # the first try; every retry adds one


_current_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "gbif_call", default=None)


@contextlib.contextmanager
def _call(deadline: float | None, attempt_s: float) -> Iterator[_Call]:
    """This thread's call, seen by ``_DeadlineRetry`` (requests sets retries per adapter,
    not per request)."""
    call = _Call(deadline, attempt_s)
    token = _current_call.set(call)
    try:
        yield call
    finally:
        _current_call.reset(token)


class _DeadlineRetry(Retry):
    """urllib3's Retry, plus: no retry that could not finish before the call's
    deadline; Retry-After read with decimals too and capped at the backoff cap;
    a count of attempts, for ``requests_made`` and error messages."""

    def increment(self, *args, **kwargs):  # after each failed attempt
        retry = super().increment(*args, **kwargs)  # MaxRetryError: no attempt follows
        call = _current_call.get()
        if call is not None:
            call.attempts += 1
        return retry

    def is_exhausted(self) -> bool:
        if super().is_exhausted():
            return True
        call = _current_call.get()
        if call is None or call.deadline is None:
            return False
        return time.monotonic() + self.get_backoff_time() + call.attempt_s > call.deadline

    def get_retry_after(self, response) -> float | None:
        seconds = _retry_after_seconds(response.headers.get("Retry-After"))
        return None if seconds is None else min(self.backoff_max, seconds)


def _reason(exc: requests.RequestException) -> str:
    """The root cause urllib3 wrapped (NewConnectionError, ReadTimeoutError...)."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    reason = reason or exc
    return f"{type(reason).__name__}: {reason}"
