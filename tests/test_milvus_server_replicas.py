"""Two replicas on one real Milvus server (the session's ``real_milvus``).

A photo added through one is in the other's similar results and prototype
within ``BOUND`` seconds (the delay docs/deploy.md states: the sync period
plus a Milvus time tick); a removal likewise. A replica running as its own
``biolit-id serve`` process, SIGKILLed in the middle of its streams, loses no
acknowledged photo, and a replica started afterwards sees every one of them,
with prototypes that agree with the photos Milvus holds.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from milvus_fixtures import collection_name, prototype, the_same_photo_through_each, unit

from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from conftest import free_port, stub_for

POLL = 0.3  # the replicas' sync period in these tests
TICK = 0.2  # Milvus's time tick (proxy.timeTickInterval): reads of other replicas' writes
BOUND = POLL + TICK + 1.5  # + one sync round trip on a busy 2-core CI machine


def seconds_until(condition, what: str, bound: float = BOUND) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > bound:
            pytest.fail(f"{what} not seen within {bound:.1f} s")
        time.sleep(0.01)
    return time.monotonic() - started


def test_adds_and_removals_reach_the_other_replica_within_the_stated_delay(
        real_milvus, make_server, tmp_path):
    gallery = real_milvus.gallery(collection_name("replicas-delay"), f"poll={POLL}")
    a = make_server(gallery=gallery, data_dir=tmp_path / "a")
    b = make_server(gallery=gallery, data_dir=tmp_path / "b")
    stub_a, stub_b = stub_for(a), stub_for(b)
    species = a.state.gallery.prototypes().names[5]
    base = prototype(b, species)
    rng = np.random.default_rng(0)
    delays: dict[str, list[float]] = {"similar": [], "prototype": [], "removed": []}
    for round_ in range(3):
        centre = unit(rng.normal(size=512))
        photos = unit(centre + 0.03 * rng.normal(size=(4, 512)))
        added = stub_a.AddExemplars(iter(
            pb.AddExemplarRequest(species=species, embedding=v.tolist(),
                                  source_uri=f"test://{round_}/{i}") for i, v in enumerate(photos)))
        target = prototype(a, species)
        first = added.exemplar_ids[0]

        def b_finds(eid=first, q=photos[0]) -> bool:
            hits = stub_b.SearchSimilar(pb.SearchSimilarRequest(embedding=q.tolist(), k=3))
            return bool(hits.results) and hits.results[0].exemplar_id == eid

        delays["similar"].append(seconds_until(b_finds, "A's photo in B's similar results"))
        delays["prototype"].append(seconds_until(
            lambda t=target: np.allclose(prototype(b, species), t, atol=1e-6),
            "A's new prototype in B"))
        removed = stub_b.RemoveExemplars(pb.RemoveExemplarsRequest(
            exemplar_ids=list(added.exemplar_ids)))
        assert removed.removed_count == 4
        delays["removed"].append(seconds_until(
            lambda q=photos[0]: np.allclose(prototype(a, species), base, atol=1e-6)
            and not stub_a.SearchSimilar(pb.SearchSimilarRequest(
                embedding=q.tolist(), k=1, species=species)).results,
            "B's removal in A (prototype and similar results)"))
    print(f"\nreal Milvus {real_milvus.port}, poll {POLL} s: add->B similar "
          f"{max(delays['similar']):.2f} s, add->B prototype {max(delays['prototype']):.2f} s, "
          f"removal->A {max(delays['removed']):.2f} s (worst of 3)")
    assert species not in a.state.gallery.exemplar_counts()


def test_the_same_photo_through_both_replicas_is_one_row(real_milvus, make_server, tmp_path):
    gallery = real_milvus.gallery(collection_name("replicas-same"), f"poll={POLL}&sweep=1")
    a = make_server(gallery=gallery, data_dir=tmp_path / "a")
    b = make_server(gallery=gallery, data_dir=tmp_path / "b")
    species = a.state.gallery.prototypes().names[0]
    first, again = the_same_photo_through_each([stub_for(a), stub_for(b)], species)
    assert list(again.exemplar_ids) == list(first.exemplar_ids)  # same id, one row
    listed = stub_for(b).ListExemplars(pb.ListExemplarsRequest(species=species))
    assert listed.total_count == 1 and len(listed.exemplars) == 1
    # Sent within a time tick, B may have counted it once more: the sweeps repair that.
    seconds_until(lambda: a.state.gallery.exemplar_counts().get(species) == 1
                  and b.state.gallery.exemplar_counts().get(species) == 1,
                  "one photo in both replicas' counts", bound=10.0)


# ------------------------------------------------- a replica killed mid-stream


class Writer(threading.Thread):
    """Small AddExemplars streams until stopped or the replica dies; records what was acked."""

    def __init__(self, port: int, species: list[str], seed: int) -> None:
        super().__init__(daemon=True)
        self.stub = pb_grpc.SpeciesIdentifierStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        self.species, self.rng = species, np.random.default_rng(seed)
        self.acked: set[int] = set()
        self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            vectors = unit(self.rng.normal(size=(40, 512)))
            try:
                reply = self.stub.AddExemplars(iter(
                    pb.AddExemplarRequest(species=self.species[i % len(self.species)],
                                          embedding=v.tolist()) for i, v in enumerate(vectors)),
                    timeout=30)
                self.acked.update(reply.exemplar_ids)
            except grpc.RpcError:
                self.failed += 1
                return  # the replica is gone


def all_ids(stub) -> set[int]:
    out, token = set(), ""
    while True:
        page = stub.ListExemplars(pb.ListExemplarsRequest(page_size=1000, page_token=token))
        out.update(e.exemplar_id for e in page.exemplars)
        token = page.next_page_token
        if not token:
            return out


def test_a_replica_killed_mid_stream_loses_nothing_acknowledged(
        real_milvus, make_server, demo_model_spec, tmp_path: Path):
    gallery = real_milvus.gallery(collection_name("replicas-kill"), f"poll={POLL}&sweep=2")
    survivor = make_server(gallery=gallery, data_dir=tmp_path / "a")
    species = list(survivor.state.gallery.prototypes().names[:3])
    port = free_port()
    log = open(tmp_path / "victim.log", "w")  # noqa: SIM115
    victim = subprocess.Popen(
        [sys.executable, "-m", "biolit_id.cli.main", "serve", "--model", demo_model_spec,
         "--gallery", gallery, "--data-dir", str(tmp_path / "victim"), "--port", str(port),
         "--no-http"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:  # up once it answers
            try:
                pb_grpc.SpeciesIdentifierStub(grpc.insecure_channel(f"127.0.0.1:{port}")) \
                    .ListExemplars(pb.ListExemplarsRequest(page_size=1), timeout=2)
                break
            except grpc.RpcError:
                assert victim.poll() is None and time.monotonic() < deadline, \
                    f"the victim replica did not start; see {log.name}"
                time.sleep(0.5)
        writers = [Writer(port, species, 1), Writer(survivor.port, species, 2)]
        for w in writers:
            w.start()
        time.sleep(3.0)
        victim.send_signal(signal.SIGKILL)  # mid-stream: its writer is always sending
        victim.wait(10)
        time.sleep(1.0)
        writers[1].stop.set()
        for w in writers:
            w.join(60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            victim.kill()
        log.close()
    acked = writers[0].acked | writers[1].acked
    assert writers[0].acked and writers[0].failed == 1, "the kill did not land mid-stream"
    late = make_server(gallery=gallery, data_dir=tmp_path / "late")
    stored = all_ids(stub_for(late))
    assert acked <= stored, f"{len(acked - stored)} acknowledged photos lost"
    # The late replica's start repaired any species row the kill interrupted.
    counts = late.state.gallery.exemplar_counts()
    assert sum(counts.values()) == len(stored) == late.state.gallery.index.count()
    print(f"\nkill -9 mid-stream: {len(writers[0].acked)} acked by the victim, "
          f"{len(writers[1].acked)} by the survivor, {len(stored)} stored, 0 lost")
