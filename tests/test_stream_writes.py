"""AddExemplars writes a batch per transaction: same answers as one write per photo.

Over real gRPC on both backends: a stream longer than a batch, with repeats
inside it and of photos stored before, keeps one id per message in order, and
an invalid message stores exactly the messages before it.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from milvus_fixtures import collection_name

from biolit_id.index.writer import WRITE_BATCH
from biolit_id.proto import identification_pb2 as pb
from conftest import stub_for

SPECIES = ("Carcinus maenas", "Patella vulgata")


def photos(running, n: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, running.state.model.embedding_dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).tolist()


def requests(vectors: list[list[float]], order: list[int] | None = None):
    """Photo ``i`` of ``vectors`` for each ``i`` in ``order`` (default: each once)."""
    order = list(range(len(vectors))) if order is None else order
    return [pb.AddExemplarRequest(species=SPECIES[i % 2], embedding=vectors[i],
                                  source_uri=f"v{i}") for i in order]


def total(stub) -> int:
    return stub.ListExemplars(pb.ListExemplarsRequest(page_size=1)).total_count


@pytest.fixture(params=["faiss", "milvus-lite", "milvus-server"])
def running(request, make_server, tmp_path):
    gallery = {"faiss": "faiss", "milvus-lite": f"milvus-lite:{tmp_path / 'g.db'}?poll=0"}.get(
        request.param)
    if gallery is None:
        gallery = request.getfixturevalue("real_milvus").gallery(
            collection_name(request.node.nodeid), "poll=0")
    return make_server(gallery=gallery)


def test_a_long_stream_keeps_one_id_per_message_in_order(running):
    stub = stub_for(running)
    vectors = photos(running, 2 * WRITE_BATCH + 7)
    first = stub.AddExemplars(iter(requests(vectors[:5])))
    # Repeats: of photos stored by an earlier stream, and of photos earlier in this one.
    stream = [*range(len(vectors)), 0, 1, 2, WRITE_BATCH, WRITE_BATCH + 1]
    response = stub.AddExemplars(iter(requests(vectors, stream)))
    ids = list(response.exemplar_ids)
    assert len(ids) == len(stream)
    assert ids[:5] == list(first.exemplar_ids)
    assert len(set(ids)) == len(vectors)  # every repeat answered with the stored id
    assert ids[len(vectors):] == ids[:3] + ids[WRITE_BATCH:WRITE_BATCH + 2]
    assert set(response.species_updated) == set(SPECIES)
    assert total(stub) == len(vectors)
    listed = stub.ListExemplars(pb.ListExemplarsRequest(page_size=1000)).exemplars
    by_uri = {e.source_uri: e.exemplar_id for e in listed}
    assert [by_uri[f"v{i}"] for i in range(len(vectors))] == ids[:len(vectors)]


def test_an_invalid_message_stores_exactly_the_messages_before_it(running):
    stub = stub_for(running)
    vectors = photos(running, WRITE_BATCH + 20, seed=1)
    bad_at = WRITE_BATCH + 10  # one batch written, ten photos pending
    stream = requests(vectors)
    stream[bad_at] = pb.AddExemplarRequest(species="Nonexistens species", embedding=vectors[0])
    with pytest.raises(grpc.RpcError) as info:
        stub.AddExemplars(iter(stream))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"message {bad_at}:" in info.value.details()
    assert f"the {bad_at} message(s) before it are stored" in info.value.details()
    assert total(stub) == bad_at
    # The prototypes took the stored photos: a query equal to one of them finds it.
    hits = stub.SearchSimilar(pb.SearchSimilarRequest(embedding=vectors[bad_at - 1], k=1))
    assert hits.results[0].source_uri == f"v{bad_at - 1}"
