"""``biolit-id infer-csv --server``: the in-process CSV, answered by a real service.

A real server on loopback; what it received is read from its own decoder,
so the test sees the bytes that crossed the wire.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from biolit_id.cli.client.upload import UPLOAD_SHORT_SIDE, downsize_for_upload
from biolit_id.cli.infer_csv import errors_path
from biolit_id.cli.main import main as cli
from biolit_id.cli.seedcompat.formats import SEED_COLUMNS
from biolit_id.server.inference.embedders.calibration import synthetic_photos
from conftest import photo_bytes

BIG = (1200, 900)  # short side above the upload size: downsized before sending
SMALL = (300, 200)  # already small: sent as it is


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i, data in enumerate(synthetic_photos(3, BIG, seed=5)):
        (root / f"big{i}.jpg").write_bytes(data)
    (root / "small.jpg").write_bytes(photo_bytes(20, "JPEG", size=SMALL))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root



@pytest.fixture
def server(make_server, seed_bundle: Path):
    """A running service plus the sizes of the photos it decoded, in arrival order."""
    running = make_server(bundle=seed_bundle)
    identifier = running.state.identifier
    received: list[int] = []
    decode = identifier.decode

    def recording(image: bytes):
        received.append(len(image))
        return decode(image)

    identifier.decode = recording
    return running, received


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _in_process(photos: Path, out: Path, model: str, bundle: Path) -> list[dict[str, str]]:
    assert cli(["infer-csv", "--images", str(photos), "--output", str(out), "--model", model,
                "--bundle", str(bundle), "--data-dir", str(out.parent / f"{out.stem}-data")]) == 0
    return _read(out)[1]


def _remote(photos: Path, out: Path, port: int, *extra: str) -> int:
    return cli(["infer-csv", "--images", str(photos), "--output", str(out),
                "--server", f"127.0.0.1:{port}", "--workers", "2", *extra])


def test_server_mode_writes_the_in_process_csv(photo_dir, seed_bundle, demo_model_spec,
                                               server, tmp_path, capsys):
    running, received = server
    local = _in_process(photo_dir, tmp_path / "local.csv", demo_model_spec, seed_bundle)
    assert len(local) == 4

    out = tmp_path / "originals.csv"
    assert _remote(photo_dir, out, running.port, "--send-originals") == 0
    header, rows = _read(out)
    assert header == list(SEED_COLUMNS)
    assert rows == local  # same predictions, confidences, candidates, column for column
    assert [e["image"] for e in _read(errors_path(out))[1]] == ["broken.jpg"]
    assert "4 images identified" in capsys.readouterr().out
    originals = {p.stat().st_size for p in photo_dir.iterdir()}
    assert sorted(received) == sorted(originals)


def test_server_mode_sends_downsized_photos_by_default(photo_dir, seed_bundle, demo_model_spec,
                                                       server, tmp_path):
    running, received = server
    out = tmp_path / "remote.csv"
    assert _remote(photo_dir, out, running.port) == 0
    _, rows = _read(out)

    # What crossed the wire: exactly `biolit-id identify`'s downsizing.
    expected = {p.name: len(downsize_for_upload(p.read_bytes())) for p in photo_dir.iterdir()}
    assert sorted(received) == sorted(expected.values())
    for name in ("big0.jpg", "big1.jpg", "big2.jpg"):
        assert expected[name] < (photo_dir / name).stat().st_size
    assert expected["small.jpg"] == (photo_dir / "small.jpg").stat().st_size
    assert min(SMALL) < UPLOAD_SHORT_SIDE < min(BIG)

    # The answers are the in-process ones for the downsized photos.
    shrunk = tmp_path / "shrunk"
    shrunk.mkdir()
    for p in photo_dir.iterdir():
        (shrunk / p.name).write_bytes(downsize_for_upload(p.read_bytes()))
    assert rows == _in_process(shrunk, tmp_path / "shrunk.csv", demo_model_spec, seed_bundle)


def test_server_mode_refusals(photo_dir, server, tmp_path, capsys):
    running, received = server
    out = tmp_path / "x.csv"
    assert _remote(photo_dir, out, running.port, "--taxonomy") == 1
    assert "--taxonomy" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # --images and --embeddings are exclusive
        _remote(photo_dir, out, running.port, "--embeddings", str(out))
    closed = running.port
    running.stop(0)
    assert _remote(photo_dir, out, closed, "--timeout", "5") == 1
    assert "UNAVAILABLE" in capsys.readouterr().out
    assert received == []
