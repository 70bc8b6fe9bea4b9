"""What the Milvus at the other end supports, asked once when a gallery opens.

One code path serves milvus-lite and Milvus servers from 2.3 to 2.6: where
they differ, the gallery asks ``ServerCaps`` instead of testing a version.
The version only gives the first guess; what can be tried is tried:

* **scalar index on ``species``**: INVERTED (Milvus >= 2.4, milvus-lite),
  else Trie (the VARCHAR index of Milvus 2.3), else none (filters still
  work, by scan). Each kind is tried in that order and the first the server
  accepts is kept (``scalar_index_candidates``); 2.3 refuses INVERTED with
  "index type not match", so it starts at Trie.
* **upsert and ARRAY fields** (the exemplar's raw embedding, a species'
  running sums): Milvus >= 2.3 and milvus-lite. Older servers are refused
  with a message, not served wrongly.
* **consistency**: on a server, a ``Strong`` read waits for the server's
  time tick (``proxy.timeTickInterval``, 200 ms by default: a Strong search
  measured 210 ms on Milvus 2.3.5 where ``Session`` took 3 ms). Reads that
  must see every replica's writes (the duplicate check before an add, the
  species row read before it is written back, a removal's lookup) stay
  Strong; searches, pages, counts and the prototype polls use
  ``read_consistency``: ``Session`` on a server (this replica's own writes
  are always seen: pymilvus sends the last write's timestamp), ``Strong`` on
  milvus-lite, where it costs nothing. The URI's ``consistency=`` overrides
  the read level.
* JSON fields (Milvus >= 2.2.8, milvus-lite) are not used by the schema.

Tested against: milvus-lite 3.2.2 and the Milvus 2.3.5 standalone server
(the ``milvus`` package), both with pymilvus 3.0.2.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from biolit_id.index.milvus.errors import MilvusConfigError

log = logging.getLogger(__name__)

OLDEST = (2, 3)  # upsert and ARRAY fields
NEWEST_TESTED = (2, 3)
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class ServerCaps:
    version_text: str
    lite: bool
    version: tuple[int, int, int]  # Milvus version; milvus-lite: the Milvus it mirrors

    @property
    def scalar_index_candidates(self) -> tuple[str, ...]:
        """Scalar index kinds for a VARCHAR field, best first, to try in order."""
        if self.lite or self.version >= (2, 4, 0):
            return ("INVERTED", "Trie")
        return ("Trie",)

    @property
    def read_consistency(self) -> str:
        """The level for searches, pages, counts and polls (see the module's docstring)."""
        return "Strong" if self.lite else "Session"

    @property
    def describe(self) -> str:
        return f"milvus-lite ({self.version_text})" if self.lite else \
            f"Milvus {'.'.join(map(str, self.version))} ({self.version_text})"


def parse_caps(version_text: str, lite: bool) -> ServerCaps:
    """Capabilities from ``get_server_version``'s answer ("v2.3.5-lite", "2.6.1",
    "milvus_lite-3.2.2", a cloud's "Compatible with Milvus 2.5" ...)."""
    text = str(version_text or "")
    lite = lite or text.lower().startswith("milvus_lite")
    if lite:  # milvus-lite 3.x mirrors the current Milvus API
        return ServerCaps(text, True, (2, 6, 0))
    match = _VERSION.search(text)
    if match is None:
        log.warning("Milvus reported version %r; assuming a current server", text)
        return ServerCaps(text, False, (2, 6, 0))
    version = (int(match[1]), int(match[2]), int(match[3] or 0))
    if version[:2] < OLDEST:
        raise MilvusConfigError(
            f"Milvus {text} is older than {OLDEST[0]}.{OLDEST[1]}: the gallery needs upsert "
            "and ARRAY fields. Upgrade the server (2.3 to 2.6 are supported).")
    return ServerCaps(text, False, version)


def probe(client, lite: bool) -> ServerCaps:
    """Ask the server once; a server that cannot say is taken for a current one."""
    try:
        text = client.get_server_version()
    except Exception as exc:  # the probe must not be what breaks a start
        if lite:
            return parse_caps("milvus_lite", True)
        log.warning("cannot read the Milvus server version (%s); assuming a current one", exc)
        return ServerCaps("unknown", False, (2, 6, 0))
    return parse_caps(text, lite)


def is_index_kind_refusal(exc: BaseException) -> bool:
    """The server does not know or allow this scalar index kind for the field."""
    text = str(exc).lower()
    return any(w in text for w in ("index type not match", "invalid index type",
                                   "not supported", "invalid parameter", "unsupported"))
