"""Shared fixtures: a tiny demo model on disk and real servers on loopback."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from browser_fixtures import browser  # noqa: F401 (the page tests' Chromium)
from milvus_fixtures import milvus_uri, real_milvus  # noqa: F401 (one real Milvus per session)
from PIL import Image

from biolit_id.cli.demo_model import write_demo_model
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from biolit_id.server.app import RunningServer, start_server
from biolit_id.server.config import ServerConfig

SEED_DIR = Path(__file__).resolve().parents[2] / "shared" / "seed-v4"
SEED_V2_DIR = SEED_DIR.parent / "seed-v2"


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture(scope="session")
def vit_l14_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BioCLIP-2's architecture (ViT-L-14, 768-d), random weights; once per session (~10 s)."""
    return write_demo_model(tmp_path_factory.mktemp("vit-l-14"), arch="ViT-L-14")


@pytest.fixture(scope="session")
def demo_model_spec(demo_model_dir: Path) -> str:
    return f"local-dir:{demo_model_dir}"


@pytest.fixture(scope="session")
def loaded_demo_model(demo_model_spec: str):
    from biolit_id.server.inference.model_loader import load_model

    return load_model(demo_model_spec)


def photo_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (320, 240),
                mode: str = "RGB") -> bytes:
    """A deterministic synthetic photo (smooth colour field plus noise)."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.uniform(0, 255, size=3)
    grad = rng.uniform(-120, 120, size=(2, 3))
    arr = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    arr += rng.normal(0, 12, size=arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def make_server(tmp_path: Path, demo_model_spec: str) -> Iterator[Callable[..., RunningServer]]:
    """Start real servers on a free loopback port; all are stopped at teardown."""
    started: list[RunningServer] = []

    def _make(**overrides) -> RunningServer:
        config = ServerConfig(
            model=demo_model_spec, data_dir=tmp_path / "data", port=0, grace_seconds=1.0
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        running = start_server(config)
        started.append(running)
        return running

    yield _make
    for running in started:
        running.stop(0.5)


def code_of(call) -> grpc.StatusCode:
    """The status a gRPC call ends with (OK when it returns)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def stub_for(running: RunningServer) -> pb_grpc.SpeciesIdentifierStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    return pb_grpc.SpeciesIdentifierStub(channel)


@pytest.fixture
def zero_shot_server(make_server) -> RunningServer:
    return make_server()


@pytest.fixture
def stub(zero_shot_server: RunningServer) -> pb_grpc.SpeciesIdentifierStub:
    return stub_for(zero_shot_server)


def free_port() -> int:
    """A loopback TCP port free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Whether ``condition()`` came true within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture(scope="session")
def seed_bundle(tmp_path_factory: pytest.TempPathFactory, loaded_demo_model,
                demo_model_spec: str) -> Path:
    """The seed v4's published head and prototypes imported over the demo model."""
    from biolit_id.cli.seedcompat.import_v4 import import_seed

    bundle = import_seed(SEED_DIR / "best_model_top50.pth", SEED_DIR / "prototypes_v4.pt",
                         demo_model_spec, model=loaded_demo_model)
    return bundle.save(tmp_path_factory.mktemp("bundle"))


def photo_folder(folder: Path, n: int, seed: int, size: tuple[int, int] = (480, 360)) -> Path:
    """``n`` synthetic phone-like JPEGs in a new ``folder`` (p0.jpg, p1.jpg...)."""
    from biolit_id.server.inference.embedders.calibration import synthetic_photos

    folder.mkdir()
    for i, data in enumerate(synthetic_photos(n, size, seed=seed)):
        (folder / f"p{i}.jpg").write_bytes(data)
    return folder
