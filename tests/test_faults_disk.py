"""A full disk during AddExemplars, for real: the data directory is a small tmpfs.

The filesystem is filled with a ballast file while the server runs; the stream
must end with RESOURCE_EXHAUSTED, keep every photo before the failing one and
nothing of it, Identify must keep answering, and adds must work again as soon
as the ballast is deleted, without a restart.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from biolit_id.proto import identification_pb2 as pb
from conftest import photo_bytes, stub_for

SPECIES = "Carcinus maenas"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs (mounting needs root: CI and the dev machines run as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path, leave: int = 0) -> Path:
    """Write a ballast file until the filesystem refuses (ENOSPC), then give back
    ``leave`` bytes so that a few photos still fit."""
    ballast = directory / "ballast"
    chunk = b"\0" * 65536
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with open(ballast, "ab", buffering=0) as f:  # the last partial block too
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass
    if leave:
        os.truncate(ballast, max(0, ballast.stat().st_size - leave))
    return ballast


def count(stub) -> int:
    return stub.ListExemplars(pb.ListExemplarsRequest(species=SPECIES)).total_count


def adds(first_seed: int, n: int) -> list[pb.AddExemplarRequest]:
    return [pb.AddExemplarRequest(species=SPECIES, image=photo_bytes(first_seed + i),
                                  source_uri=f"photo-{first_seed + i}.jpg")
            for i in range(n)]


def test_disk_full_mid_stream_keeps_acknowledged_photos_and_recovers(small_fs, make_server):
    data = small_fs / "data"
    running = make_server(data_dir=data)
    stub = stub_for(running)
    stub.AddExemplars(iter(adds(0, 3)))
    assert count(stub) == 3
    query = pb.IdentifyRequest(embedding=np.ones(running.state.model.embedding_dim).tolist())
    before = stub.Identify(query).decision.species

    ballast = fill(small_fs, leave=1024 * 1024)  # room for a batch or two, not for all
    # Enough photos that the store must grow past what SQLite had already allocated.
    with pytest.raises(grpc.RpcError) as info:
        stub.AddExemplars(iter(adds(100, 400)), timeout=120)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = info.value.details()
    assert "disk is full" in details, details
    # Photos are written a batch per transaction: the error names the failing batch.
    stored_before = int(re.search(r"the (\d+) message\(s\) before (?:it|them) are stored",
                                  details)[1])
    failed_at = int(re.search(r"messages? (\d+)", details)[1])
    assert failed_at == stored_before
    assert 0 < stored_before < 400  # some photos fitted in the space left, not all
    # Every photo before the failing one is kept, nothing of the failing one.
    assert count(stub) == 3 + stored_before
    listed = stub.ListExemplars(pb.ListExemplarsRequest(species=SPECIES, page_size=1000))
    uris = {e.source_uri for e in listed.exemplars}
    assert f"photo-{100 + failed_at}.jpg" not in uris
    assert {f"photo-{100 + i}.jpg" for i in range(stored_before)} <= uris

    # Reads still work on a full disk.
    assert stub.Identify(query).decision.species == before
    assert stub.SearchSimilar(pb.SearchSimilarRequest(exemplar_id=1, k=2)).results

    # Space freed: the very same server takes adds again.
    ballast.unlink()
    response = stub.AddExemplars(iter(adds(1000, 2)))
    assert len(response.exemplar_ids) == 2
    assert count(stub) == 3 + stored_before + 2
    store = data / "gallery" / "gallery.sqlite3"
    with sqlite3.connect(store) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
