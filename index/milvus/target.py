"""Which Milvus a ``--gallery`` value names, how it is indexed, and the client to reach it.

``milvus-lite:PATH[?opts]`` is embedded Milvus (one process per file);
``milvus://HOST:PORT/COLLECTION[?opts]`` a Milvus server or cluster. Options
and what each one does: docs/deploy.md. The token for a secured cluster comes
from ``$BIOLIT_MILVUS_TOKEN`` so that it never shows in a command line or a log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from biolit_id.index.milvus.client import ResilientClient
from biolit_id.index.milvus.errors import MilvusConfigError, MilvusGalleryError, milvus_errors

INDEX_KINDS = {
    "flat": "FLAT",
    "ivf-flat": "IVF_FLAT",
    "ivf-sq8": "IVF_SQ8",
    "ivf-pq": "IVF_PQ",
    "hnsw": "HNSW",
    "autoindex": "AUTOINDEX",
}
CONSISTENCY = ("Strong", "Bounded", "Session", "Eventually")
_INT_OPTIONS = ("nlist", "nprobe", "m", "ef", "ef_construction", "pq_m")
_SECONDS_OPTIONS = ("poll", "sweep", "refine")


@dataclass(frozen=True)
class MilvusTarget:
    """Where the gallery lives and how it is indexed and synchronised.

    Build parameters go to Milvus as its ``params`` JSON key-value: servers
    accept it, and milvus-lite 3.x reads only that form (it silently ignores
    flat ``nlist=...`` pairs).
    """

    uri: str
    collection: str
    lite: bool
    index: str = "flat"
    nlist: int = 1024
    nprobe: int = 16
    m: int = 16
    ef: int = 64
    ef_construction: int = 200
    pq_m: int = 0
    consistency: str = ""  # reads' level; "": by server (caps.read_consistency)
    poll_seconds: float = 1.0
    sweep_seconds: float = 60.0
    refine_seconds: float = 0.0
    token: str = field(default="", repr=False)

    @property
    def species_collection(self) -> str:
        return f"{self.collection}_species"

    def describe(self) -> str:
        where = f"milvus-lite:{self.uri}" if self.lite else self.uri
        return f"{where}/{self.collection} ({self.index_description()})"

    def index_description(self) -> str:
        if self.index == "flat":
            return "flat"
        if self.index in ("ivf-flat", "ivf-sq8"):
            return f"{self.index},nlist={self.nlist},nprobe={self.nprobe}"
        if self.index == "ivf-pq":
            return f"ivf-pq,nlist={self.nlist},nprobe={self.nprobe},pq_m={self.pq_m}"
        if self.index == "hnsw":
            return f"hnsw,m={self.m},ef_construction={self.ef_construction},ef={self.ef}"
        return self.index

    def build_params(self, dim: int) -> dict:
        if self.index in ("ivf-flat", "ivf-sq8"):
            return {"nlist": self.nlist}
        if self.index == "ivf-pq":
            m = self.pq_m or max(1, dim // 8)
            if dim % m:
                raise MilvusConfigError(f"pq_m={m} must divide the vector size {dim}")
            return {"nlist": self.nlist, "m": m, "nbits": 8}
        if self.index == "hnsw":
            return {"M": self.m, "efConstruction": self.ef_construction}
        return {}

    def search_params(self) -> dict:
        if self.index.startswith("ivf"):
            return {"nprobe": self.nprobe}
        if self.index == "hnsw":
            return {"ef": self.ef}
        return {}


def parse_target(text: str) -> MilvusTarget:
    """Parse ``milvus-lite:PATH[?opts]`` or ``milvus://HOST:PORT/COLLECTION[?opts]``."""
    text = (text or "").strip()
    base, _, query = text.partition("?")
    try:
        options = dict(parse_qsl(query, keep_blank_values=False, strict_parsing=bool(query)))
    except ValueError:
        raise MilvusConfigError(f"cannot parse the options in {text!r} (key=value&...)") from None
    if base.startswith("milvus-lite:"):
        path = base[len("milvus-lite:"):]
        if not path:
            raise MilvusConfigError("milvus-lite needs a path: --gallery milvus-lite:./gallery.db")
        if not path.endswith(".db"):
            path = str(Path(path) / "gallery.db")  # a directory: the file inside it
        uri, collection, lite = os.path.abspath(path), options.pop("collection", ""), True
        collection = collection or "biolit_gallery"
    elif base.startswith("milvus://"):
        parts = urlsplit(base)
        collection = parts.path.strip("/")
        if not parts.hostname or not collection or "/" in collection:
            raise MilvusConfigError(
                f"expected milvus://HOST:PORT/COLLECTION, got {text!r}")
        uri, lite = f"http://{parts.hostname}:{parts.port or 19530}", False
        if "collection" in options:
            raise MilvusConfigError("the collection is the URI's path: milvus://HOST:PORT/NAME")
    else:
        raise MilvusConfigError(
            f"not a Milvus gallery: {text!r}; use milvus-lite:PATH or milvus://HOST:PORT/NAME")
    if not collection.replace("_", "a").isalnum() or collection[0].isdigit():
        raise MilvusConfigError(
            f"collection name {collection!r}: letters, digits and _ only, not starting "
            "with a digit")
    return MilvusTarget(uri=uri, collection=collection, lite=lite,
                        token=os.environ.get("BIOLIT_MILVUS_TOKEN", ""),
                        **_option_values(options))


def _option_values(options: dict[str, str]) -> dict:
    values: dict = {}
    for key, value in options.items():
        if key in _INT_OPTIONS:
            try:
                values[key] = int(value)
            except ValueError:
                raise MilvusConfigError(f"option {key} needs an integer, got {value!r}") from None
            if values[key] < (0 if key == "pq_m" else 1):
                raise MilvusConfigError(f"option {key} must be positive")
        elif key in _SECONDS_OPTIONS:
            try:
                values[f"{key}_seconds"] = float(value)
            except ValueError:
                raise MilvusConfigError(f"option {key} needs seconds, got {value!r}") from None
        elif key == "index":
            if value not in INDEX_KINDS:
                raise MilvusConfigError(f"index {value!r}: choose one of {sorted(INDEX_KINDS)}")
            values["index"] = value
        elif key == "consistency":
            match = [c for c in CONSISTENCY if c.lower() == value.lower()]
            if not match:
                raise MilvusConfigError(f"consistency {value!r}: choose one of {CONSISTENCY}")
            values["consistency"] = match[0]
        else:
            raise MilvusConfigError(f"unknown Milvus gallery option {key!r}")
    return values


def connect(target: MilvusTarget):
    """A MilvusClient for the target; clear errors for the usual mistakes."""
    try:
        from pymilvus import MilvusClient  # optional extra: only a Milvus gallery needs it
    except ImportError:
        raise MilvusConfigError(
            "the Milvus gallery needs the optional dependencies: pip install 'biolit-id[milvus]'"
        ) from None
    if target.lite:
        Path(target.uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            return MilvusClient(target.uri)
        except Exception as exc:
            raise MilvusGalleryError(
                f"cannot open milvus-lite database {target.uri} ({exc}). milvus-lite allows ONE "
                "process per database (file lock): to share it between servers run "
                f"`milvus-lite server --data-dir {target.uri} --port 19530` and use "
                f"--gallery milvus://127.0.0.1:19530/{target.collection}"
            ) from exc
    with milvus_errors(f"connection to {target.uri}"):
        # Survives the server being stopped and restarted (index/milvus/client.py).
        return ResilientClient(lambda timeout: MilvusClient(
            uri=target.uri, token=target.token or "", timeout=timeout), target.uri)
