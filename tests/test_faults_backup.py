"""Online backup while adds arrive, and a restore that brings back exactly that point.

A thread keeps adding photos through the running server while ``biolit-id
gallery backup`` runs; the copy must equal the live store at one commit (for
adds: every row up to some id, none after, none torn), and a server started
on the restored data directory must serve exactly those photos.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from biolit_id.cli.main import main
from biolit_id.proto import identification_pb2 as pb
from conftest import stub_for

SPECIES = "Carcinus maenas"


def embedding_add(rng: np.random.Generator, dim: int, i: int) -> pb.AddExemplarRequest:
    return pb.AddExemplarRequest(species=SPECIES, embedding=rng.normal(size=dim).tolist(),
                                 source_uri=f"photo-{i}.jpg", license="CC-BY-4.0")


def rows(store: Path) -> list[tuple]:
    with sqlite3.connect(store) as conn:
        return conn.execute(
            "SELECT id, species, embedding, source_uri, license, content_sha256 "
            "FROM exemplars ORDER BY id").fetchall()


def listed(stub) -> list[tuple]:
    out, token = [], ""
    while True:
        page = stub.ListExemplars(pb.ListExemplarsRequest(page_size=500, page_token=token))
        out += [(e.exemplar_id, e.species, e.source_uri, e.content_sha256)
                for e in page.exemplars]
        token = page.next_page_token
        if not token:
            return out


def test_backup_during_adds_restores_the_store_at_its_point(make_server, tmp_path, capsys):
    data = tmp_path / "data"
    running = make_server(data_dir=data)
    stub = stub_for(running)
    dim = running.state.model.embedding_dim
    rng = np.random.default_rng(0)
    stub.AddExemplars(iter([embedding_add(rng, dim, i) for i in range(300)]))

    stop = threading.Event()
    added: list[int] = []

    def keep_adding() -> None:
        local = np.random.default_rng(1)
        i = 1000
        while not stop.is_set():
            reply = stub.AddExemplars(iter([embedding_add(local, dim, i)]))
            added.extend(reply.exemplar_ids)
            i += 1

    adder = threading.Thread(target=keep_adding)
    adder.start()
    try:
        while len(added) < 5:  # adds are flowing before the backup starts
            threading.Event().wait(0.01)
        before = 300 + len(added)
        assert main(["gallery", "backup", "--data-dir", str(data), str(tmp_path / "bk")]) == 0
        after_backup = 300 + len(added)
        while 300 + len(added) < after_backup + 5:  # ...and after it ends
            threading.Event().wait(0.01)
    finally:
        stop.set()
        adder.join()
    info = json.loads((tmp_path / "bk" / "backup.json").read_text())
    copy = rows(tmp_path / "bk" / "gallery.sqlite3")
    live = rows(data / "gallery" / "gallery.sqlite3")
    assert before <= info["exemplars"] == len(copy) <= after_backup
    assert len(live) > len(copy)  # adds went on after the backup's point
    # The copy is the live store cut at one commit: a prefix of its rows, byte for byte.
    assert copy == live[: len(copy)]
    assert info["max_exemplar_id"] == copy[-1][0]
    assert "backed up" in capsys.readouterr().out

    # Restore refuses while a server has the store open...
    restored = tmp_path / "restored"
    assert main(["gallery", "restore", "--data-dir", str(data), str(tmp_path / "bk")]) == 1
    assert "in use" in capsys.readouterr().err
    # ...and into a stopped data dir (a fresh one here) brings back exactly that point.
    assert main(["gallery", "restore", "--data-dir", str(restored), str(tmp_path / "bk")]) == 0
    again = make_server(data_dir=restored)
    again_stub = stub_for(again)
    assert listed(again_stub) == [(r[0], r[1], r[3], r[5]) for r in copy]
    query = np.frombuffer(copy[-1][2], dtype="<f4").tolist()
    hit = again_stub.SearchSimilar(pb.SearchSimilarRequest(embedding=query, k=1)).results[0]
    assert hit.exemplar_id == copy[-1][0] and hit.license == "CC-BY-4.0"
    # The restored gallery takes adds where the backup left off.
    reply = again_stub.AddExemplars(iter([embedding_add(rng, dim, 99_999)]))
    assert reply.exemplar_ids[0] > copy[-1][0]


def test_restore_refuses_a_damaged_backup(make_server, tmp_path, capsys):
    data = tmp_path / "data"
    running = make_server(data_dir=data)
    stub_for(running).AddExemplars(iter([embedding_add(np.random.default_rng(2),
                                                       running.state.model.embedding_dim, 0)]))
    assert main(["gallery", "backup", "--data-dir", str(data), str(tmp_path / "bk")]) == 0
    copy = tmp_path / "bk" / "gallery.sqlite3"
    raw = bytearray(copy.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    copy.write_bytes(bytes(raw))
    running.stop(0.5)
    before = (data / "gallery" / "gallery.sqlite3").read_bytes()
    assert main(["gallery", "restore", "--data-dir", str(data), str(tmp_path / "bk")]) == 1
    assert "SHA-256" in capsys.readouterr().err
    assert (data / "gallery" / "gallery.sqlite3").read_bytes() == before  # untouched


@pytest.mark.parametrize("missing", ["store", "manifest"])
def test_backup_and_restore_report_missing_files(tmp_path, capsys, missing):
    if missing == "store":
        assert main(["gallery", "backup", "--data-dir", str(tmp_path / "none"),
                     str(tmp_path / "bk")]) == 1
        assert "no gallery store" in capsys.readouterr().err
    else:
        (tmp_path / "bk").mkdir()
        assert main(["gallery", "restore", "--data-dir", str(tmp_path / "d"),
                     str(tmp_path / "bk")]) == 1
        assert "backup.json" in capsys.readouterr().err
