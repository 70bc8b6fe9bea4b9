"""The command line as a user runs it: serve in a subprocess, identify, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from biolit_id.cli.main import main
from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from conftest import free_port, photo_bytes


def wait_serving(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read().decode()}")
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                return
        except grpc.RpcError:
            time.sleep(0.2)
    raise AssertionError("server did not become SERVING")


@pytest.fixture
def served(tmp_path: Path, demo_model_spec: str):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "biolit_id.cli.main", "serve", "--model", demo_model_spec,
         "--data-dir", str(tmp_path / "data"), "--port", str(port), "--grace-seconds", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_serving(port, proc)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_identify_command_prints_table_and_json(served, tmp_path: Path, capsys) -> None:
    port, _ = served
    photo = tmp_path / "crab.jpg"
    photo.write_bytes(photo_bytes(11))
    assert main(["identify", str(photo), "--server", f"127.0.0.1:{port}"]) == 0
    table = capsys.readouterr().out
    assert "method" in table and "confidence" in table and "prototypes" in table
    assert main(["identify", str(photo), "--server", f"127.0.0.1:{port}", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["photo"] == str(photo)
    assert payload["decision"]["method"] in {"METHOD_ZERO_SHOT", "METHOD_REJECTED"}
    assert len(payload["prototype_candidates"]) == 3


def test_identify_command_reports_bad_photo(served, tmp_path: Path, capsys) -> None:
    port, _ = served
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    assert main(["identify", str(bad), "--server", f"127.0.0.1:{port}"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    missing = tmp_path / "missing.jpg"
    assert main(["identify", str(missing), "--server", f"127.0.0.1:{port}"]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_one_contact_sheet_per_photo(tmp_path: Path) -> None:
    from biolit_id.cli.identify import sheet_path

    assert sheet_path(tmp_path / "out.png", Path("a.jpg"), 1) == tmp_path / "out.png"
    assert sheet_path(tmp_path / "out.png", Path("x/a.jpg"), 2) == tmp_path / "out-a.png"


def test_sigterm_drains_in_flight_calls_then_exits(served) -> None:
    port, proc = served
    stub = pb_grpc.SpeciesIdentifierStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    requests = [pb.IdentifyRequest(image=photo_bytes(i)) for i in range(40)]
    future_stream = stub.IdentifyStream(iter(requests))
    first = next(future_stream)  # the stream is in flight
    proc.send_signal(signal.SIGTERM)
    rest = list(future_stream)  # drained, not cut
    assert 1 + len(rest) == 40
    assert first.decision.method != pb.METHOD_UNSPECIFIED
    assert proc.wait(timeout=30) == 0


def test_demo_model_command_warns_loudly(tmp_path: Path, capsys) -> None:
    assert main(["demo-model", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "MEANINGLESS" in out
    assert (tmp_path / "m" / "open_clip_config.json").is_file()


def test_serve_without_model_fails_fast_with_instructions(tmp_path: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "biolit_id.cli.main", "serve", "--data-dir", str(tmp_path / "d"),
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 1
    assert "huggingface-cli download imageomics/bioclip" in proc.stderr
