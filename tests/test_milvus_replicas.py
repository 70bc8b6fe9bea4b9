"""Two servers on one Milvus gallery: a change through one reaches the other within ``poll``.

milvus-lite allows one process per database file (a file lock), so the two
replicas share it the way they would share a Milvus cluster: through a
``milvus-lite server`` process, reached at ``milvus://127.0.0.1:PORT/NAME``.
That the direct route (two processes on one ``milvus-lite:PATH``) is refused,
with a message saying what to do instead, is tested too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from milvus_fixtures import prototype, the_same_photo_through_each, unit

from biolit_id.index.milvus.errors import MilvusGalleryError
from biolit_id.index.milvus.target import connect, parse_target
from biolit_id.proto import identification_pb2 as pb
from conftest import free_port, stub_for

POLL = 0.3  # seconds: the configured sync delay
SLACK = 1.5  # one sync round trip on a busy 2-core CI machine


@pytest.fixture
def milvus_server(tmp_path: Path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "milvus"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("milvus-lite server did not start")
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(timeout=20)


def wait_for(condition, started: float, what: str) -> float:
    """Seconds from ``started`` until ``condition()`` holds; fails past POLL + SLACK."""
    while not condition():
        if time.monotonic() - started > POLL + SLACK:
            pytest.fail(f"{what} not seen within {POLL + SLACK:.1f} s")
        time.sleep(0.02)
    return time.monotonic() - started


def test_changes_through_one_replica_reach_the_other_within_the_poll_delay(
        milvus_server, make_server, tmp_path):
    gallery = f"milvus://127.0.0.1:{milvus_server}/replicas?poll={POLL}"
    a = make_server(gallery=gallery, data_dir=tmp_path / "a")
    b = make_server(gallery=gallery, data_dir=tmp_path / "b")
    stub_a, stub_b = stub_for(a), stub_for(b)
    species = a.state.gallery.prototypes().names[5]
    base = prototype(b, species)
    rng = np.random.default_rng(0)
    centre = unit(rng.normal(size=512))
    photos = unit(centre + 0.03 * rng.normal(size=(5, 512)))

    added = stub_a.AddExemplars(iter(
        pb.AddExemplarRequest(species=species, embedding=v.tolist(), source_uri=f"test://{i}",
                              license="CC-BY")
        for i, v in enumerate(photos)))
    started = time.monotonic()
    assert list(added.species_updated) == [species]
    # The exemplars themselves are shared at once: B searches and lists A's photos.
    similar = stub_b.SearchSimilar(pb.SearchSimilarRequest(embedding=photos[0].tolist(), k=3))
    assert similar.results[0].exemplar_id == added.exemplar_ids[0]
    listed = stub_b.ListExemplars(pb.ListExemplarsRequest(species=species))
    assert sorted(e.exemplar_id for e in listed.exemplars) == sorted(added.exemplar_ids)
    assert {e.license for e in listed.exemplars} == {"CC-BY"}
    # The prototype, held in each replica's memory, follows within the poll delay.
    target = prototype(a, species)
    assert not np.allclose(target, base, atol=1e-3)
    delay = wait_for(lambda: np.allclose(prototype(b, species), target, atol=1e-6), started,
                     "A's new prototype in B")
    print(f"\nadd through A -> B's prototype after {delay:.2f} s (poll {POLL} s)")
    assert b.state.gallery.exemplar_counts()[species] == 5
    answer = stub_b.Identify(pb.IdentifyRequest(embedding=centre.tolist(), top_k=3))
    assert answer.prototype_candidates[0].species == species

    # Removal through B: A's prototype goes back to the base one.
    removed = stub_b.RemoveExemplars(pb.RemoveExemplarsRequest(
        exemplar_ids=list(added.exemplar_ids)))
    assert removed.removed_count == 5
    started = time.monotonic()
    wait_for(lambda: np.allclose(prototype(a, species), base, atol=1e-6), started,
             "B's removal in A's prototype")
    assert species not in a.state.gallery.exemplar_counts()

    # A species added through A becomes usable through B.
    new = "Replicatus novus"
    stub_a.AddSpecies(pb.AddSpeciesRequest(
        scientific_name=new,
        taxonomy=pb.Taxonomy(lineage=[pb.Taxon(rank=pb.RANK_GENUS, name="Replicatus")])))
    started = time.monotonic()
    wait_for(lambda: b.state.gallery.knows(new), started, "A's new species in B")
    more = stub_b.AddExemplars(iter([pb.AddExemplarRequest(species=new,
                                                           embedding=photos[0].tolist())]))
    assert list(more.species_updated) == [new]
    assert stub_a.GetSpecies(pb.GetSpeciesRequest(scientific_name=new)).scientific_name == new


def test_the_same_photo_through_both_replicas_is_one_exemplar(milvus_server, make_server,
                                                              tmp_path):
    gallery = f"milvus://127.0.0.1:{milvus_server}/dedupe?poll={POLL}"
    a = make_server(gallery=gallery, data_dir=tmp_path / "a")
    b = make_server(gallery=gallery, data_dir=tmp_path / "b")
    species = a.state.gallery.prototypes().names[0]
    first, again = the_same_photo_through_each([stub_for(a), stub_for(b)], species)
    assert list(again.exemplar_ids) == list(first.exemplar_ids)
    assert list(again.species_updated) == []  # nothing stored the second time
    listed = stub_for(b).ListExemplars(pb.ListExemplarsRequest(species=species))
    assert listed.total_count == 1 and len(listed.exemplars) == 1


def test_two_processes_cannot_open_one_milvus_lite_file_and_are_told_what_to_do(tmp_path):
    path = tmp_path / "shared.db"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\n"
         "from pymilvus import MilvusClient\n"
         f"MilvusClient({str(path)!r}).list_collections()\n"
         "print('ready', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(MilvusGalleryError, match=r"ONE process per database.*milvus-lite "
                                                     r"server"):
            connect(parse_target(f"milvus-lite:{path}"))
    finally:
        holder.stdin.close()
        holder.wait(timeout=20)
