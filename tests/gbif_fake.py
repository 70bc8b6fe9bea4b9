"""A local stand-in for GBIF's species API (v1), on 127.0.0.1 with a free port.

Responses follow the shapes of GBIF's API documentation
(https://www.gbif.org/developer/species): ``/species/match`` returns a
NameUsageMatch (usageKey, scientificName, canonicalName, rank, status,
confidence, matchType, kingdom..species and their keys, acceptedUsageKey for
synonyms); ``/species/{key}/vernacularNames`` a paged list of
VernacularName with ISO 639-2 three-letter languages; ``/species/{key}`` a
NameUsage. Keys and names are illustrative; only the shapes matter.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CARCINIDAE = {
    "kingdom": "Animalia", "phylum": "Arthropoda", "class": "Malacostraca",
    "order": "Decapoda", "family": "Carcinidae", "genus": "Carcinus",
    "kingdomKey": 1, "phylumKey": 54, "classKey": 229, "orderKey": 637,
    "familyKey": 4453, "genusKey": 2225772,
}
TROCHIDAE = {
    "kingdom": "Animalia", "phylum": "Mollusca", "class": "Gastropoda",
    "order": "Trochida", "family": "Trochidae", "genus": "Phorcus",
    "kingdomKey": 1, "phylumKey": 52, "classKey": 225, "orderKey": 9426542,
    "familyKey": 2833, "genusKey": 7826245,
}
PATELLIDAE = {
    "kingdom": "Animalia", "phylum": "Mollusca", "class": "Gastropoda",
    "order": "Patellida", "family": "Patellidae", "genus": "Patella",
    "kingdomKey": 1, "phylumKey": 52, "classKey": 225, "orderKey": 9406297,
    "familyKey": 9434, "genusKey": 2300307,
}

MATCHES: dict[str, dict] = {
    "Carcinus maenas": {
        "usageKey": 2225776, "scientificName": "Carcinus maenas (Linnaeus, 1758)",
        "canonicalName": "Carcinus maenas", "rank": "SPECIES", "status": "ACCEPTED",
        "confidence": 99, "matchType": "EXACT", **CARCINIDAE,
        "species": "Carcinus maenas", "speciesKey": 2225776, "synonym": False,
    },
    "Carcinus maenus": {  # misspelt: GBIF corrects it, with less confidence
        "usageKey": 2225776, "scientificName": "Carcinus maenas (Linnaeus, 1758)",
        "canonicalName": "Carcinus maenas", "rank": "SPECIES", "status": "ACCEPTED",
        "confidence": 92, "matchType": "FUZZY", **CARCINIDAE,
        "species": "Carcinus maenas", "speciesKey": 2225776, "synonym": False,
    },
    "Monodonta lineata": {  # an old name: the classification is the accepted one's
        "usageKey": 5192345, "acceptedUsageKey": 7826250,
        "scientificName": "Monodonta lineata (da Costa, 1778)",
        "canonicalName": "Monodonta lineata", "rank": "SPECIES", "status": "SYNONYM",
        "confidence": 98, "matchType": "EXACT", **TROCHIDAE,
        "species": "Phorcus lineatus", "speciesKey": 7826250, "synonym": True,
    },
    "Patella foobarensis": {  # unknown epithet: GBIF falls back to the genus
        "usageKey": 2300307, "scientificName": "Patella Linnaeus, 1758",
        "canonicalName": "Patella", "rank": "GENUS", "status": "ACCEPTED",
        "confidence": 94, "matchType": "HIGHERRANK",
        **PATELLIDAE, "synonym": False,
    },
}
NO_MATCH = {"confidence": 100, "note": "No match because of too little confidence",
            "matchType": "NONE", "synonym": False}

USAGES: dict[int, dict] = {
    7826250: {
        "key": 7826250, "nubKey": 7826250, "scientificName": "Phorcus lineatus (da Costa, 1778)",
        "canonicalName": "Phorcus lineatus", "authorship": "(da Costa, 1778)",
        "rank": "SPECIES", "taxonomicStatus": "ACCEPTED", **TROCHIDAE,
        "species": "Phorcus lineatus", "speciesKey": 7826250,
    },
}

VERNACULAR: dict[int, list[dict]] = {
    2225776: [
        {"vernacularName": "Crabe vert", "language": "fra", "source": "INPN"},
        {"vernacularName": "green crab", "language": "eng", "source": "ITIS"},
        {"vernacularName": "Strandkrabbe", "language": "deu", "source": "Catalogue of Life"},
        {"vernacularName": "Shore crab", "language": "eng", "source": "WoRMS",
         "preferred": True},
        {"vernacularName": "Green Crab", "language": "eng", "source": "EOL"},
        {"vernacularName": "Crabe enragé", "language": "fra", "source": "WoRMS"},
        {"vernacularName": "European green crab", "language": "eng", "source": "ITIS"},
    ],
    7826250: [
        {"vernacularName": "Monodonte", "language": "fra", "source": "INPN"},
        {"vernacularName": "Toothed topshell", "language": "eng", "source": "WoRMS"},
    ],
    2300307: [{"vernacularName": "limpets", "language": "eng", "source": "ITIS"}],
}
PAGE_CAP = 3  # GBIF pages its lists; a small cap makes the client follow pages


class FakeGbif:
    """Serve GBIF-shaped JSON; record requests; fail on demand."""

    def __init__(self) -> None:
        self.matches = copy.deepcopy(MATCHES)
        self.usages = copy.deepcopy(USAGES)
        self.vernacular = copy.deepcopy(VERNACULAR)
        self.fail_next: list[int] = []  # HTTP statuses to answer before serving normally
        self.retry_after: str | None = None
        self.delay_s = 0.0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                # A client that gave up (timeout tests) leaves nothing to answer.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    fake._handle(self)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self) -> FakeGbif:
        self.thread.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.server.shutdown()
        self.server.server_close()

    def paths(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [p for p in self.requests if p.startswith(prefix)]

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        with self._lock:
            self.requests.append(h.path)
            failure = self.fail_next.pop(0) if self.fail_next else None
        if self.delay_s:
            time.sleep(self.delay_s)
        if failure is not None:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return _send(h, failure, {"error": "unavailable"}, headers)
        path = url.path.removeprefix("/v1")
        parts = [p for p in path.split("/") if p]
        if parts == ["species", "match"]:
            return _send(h, 200, self.matches.get(query.get("name", ""), NO_MATCH))
        if len(parts) == 3 and parts[0] == "species" and parts[2] == "vernacularNames":
            names = self.vernacular.get(int(parts[1]), [])
            offset = int(query.get("offset", 0))
            limit = min(int(query.get("limit", 20)), PAGE_CAP)
            page = names[offset : offset + limit]
            return _send(h, 200, {"offset": offset, "limit": limit,
                                  "endOfRecords": offset + limit >= len(names), "results": page})
        if len(parts) == 2 and parts[0] == "species" and int(parts[1]) in self.usages:
            return _send(h, 200, self.usages[int(parts[1])])
        return _send(h, 404, {"error": "not found"})


def _send(h: BaseHTTPRequestHandler, status: int, body: dict,
          headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode("utf-8")
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(raw)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(raw)


def refused_url() -> str:
    """A loopback URL nothing listens on (connection refused at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
