"""One real Milvus server per test session, and Milvus gallery URIs on milvus-lite or on it.

``real_milvus``: a Milvus standalone server (the ``milvus`` package, the
``milvus-server`` extra) started once per session in its own temporary
directory (~10 s on a 2-core machine) and stopped at the end; each test
gets its own collection on it. Where the package is not installed the
server variants skip, saying so; a server that is installed but fails to
start is an error, not a skip.

``milvus_uri``: parametrized over ``lite`` and ``server``; call it with the
URI options (``milvus_uri("poll=0")``) for a ``--gallery`` value, the same
collection for every call within one test (a restart reopens it).

Both are registered once for the session by ``conftest.py``. The helpers below
serve the replica tests on either kind of server.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from biolit_id.index.milvus.server import EmbeddedMilvus, MilvusServerUnavailable
from biolit_id.proto import identification_pb2 as pb

BACKENDS = ("lite", "server")
_counter = itertools.count()


@pytest.fixture(scope="session")
def real_milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMilvus]:
    try:
        server = EmbeddedMilvus(tmp_path_factory.mktemp("milvus-server"))
    except MilvusServerUnavailable as exc:
        pytest.skip(f"real-Milvus variant skipped: {exc}")
    seconds = server.start()
    print(f"\nMilvus standalone server started in {seconds:.1f} s on port {server.port}")
    yield server
    server.kill()  # its data are thrown away: no 5 s of graceful shutdown


def collection_name(nodeid: str) -> str:
    """A collection name of its own for each test (and each call of it)."""
    digest = hashlib.sha256(f"{nodeid}:{next(_counter)}".encode()).hexdigest()[:12]
    return f"t_{digest}"


@pytest.fixture(params=BACKENDS)
def milvus_uri(request, tmp_path) -> Callable[[str], str]:
    """``milvus_uri(options)`` -> a ``--gallery`` value on milvus-lite or the real server."""
    if request.param == "lite":
        return lambda options="": f"milvus-lite:{tmp_path / 'g.db'}" + (
            f"?{options}" if options else "")
    server = request.getfixturevalue("real_milvus")
    name = collection_name(request.node.nodeid)
    return lambda options="": server.gallery(name, options)


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def prototype(running, species: str) -> np.ndarray:
    """A running server's live prototype of ``species``."""
    protos = running.state.gallery.prototypes()
    return protos.vectors[protos.index()[species]].copy()


def the_same_photo_through_each(stubs, species: str) -> list:
    """One embedding added to ``species`` through each stub in turn (a stream each);
    their ``AddExemplars`` answers."""
    vec = unit(np.random.default_rng(1).normal(size=512)).tolist()
    return [stub.AddExemplars(iter([pb.AddExemplarRequest(species=species, embedding=vec)]))
            for stub in stubs]
