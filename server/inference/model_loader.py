"""Load BioCLIP (or any open_clip model) from a model spec, never hanging offline.

Specs: ``hf-hub:ORG/REPO`` (default ``hf-hub:imageomics/bioclip``, ViT-B-16,
512-d; ``hf-hub:imageomics/bioclip-2`` is ViT-L-14, 768-d; any open_clip
model of any width loads the same way) or
``local-dir:PATH`` — a folder with ``open_clip_config.json`` and the weights,
exactly what ``huggingface-cli download imageomics/bioclip --local-dir PATH``
writes, and what ``biolit-id demo-model`` writes for offline tests.
A hub spec is resolved to such a folder first (from the local HF cache when
it is there), so both specs share one loading path: open_clip's own
``local-dir:`` loader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MODEL = "hf-hub:imageomics/bioclip"
HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
HUB_PROBE_TIMEOUT_S = 3.0
# torch.nn.init's in-place initialisers: what building a model spends its time in.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
                   "orthogonal_")
_INIT_LOCK = threading.Lock()


class ModelUnavailableError(RuntimeError):
    """The model cannot be loaded; the message says how to fix it."""


def offline_instructions(repo: str) -> str:
    return (
        f"To fetch it once on a machine with internet access, run:\n"
        f"    huggingface-cli download {repo} --local-dir ./models/{repo.split('/')[-1]}\n"
        f"then copy that folder here and pass --model local-dir:./models/{repo.split('/')[-1]}\n"
        f"(for a no-download smoke run: biolit-id demo-model ./demo-model && "
        f"--model local-dir:./demo-model)."
    )


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model_dir(spec: str) -> Path:
    """Turn a spec into a local folder in open_clip's local-dir format."""
    if spec.startswith(LOCAL_PREFIX):
        path = Path(spec[len(LOCAL_PREFIX) :]).expanduser()
        if not (path / CONFIG_FILE).is_file():
            raise ModelUnavailableError(
                f"{spec}: no {CONFIG_FILE} in {path}. Expected a folder as written by "
                "`huggingface-cli download imageomics/bioclip --local-dir PATH` "
                "or `biolit-id demo-model PATH`."
            )
        return path
    if not spec.startswith(HUB_PREFIX):
        raise ModelUnavailableError(
            f"unknown model spec {spec!r}: use hf-hub:ORG/REPO or local-dir:PATH"
        )
    repo = spec[len(HUB_PREFIX) :]
    from huggingface_hub import snapshot_download

    try:  # already downloaded once: no network needed
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise ModelUnavailableError(
            f"cannot download {spec}: the Hugging Face hub is not reachable from here "
            f"and the model is not in the local cache.\n{offline_instructions(repo)}"
        )
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    try:
        return Path(snapshot_download(repo))
    except Exception as exc:  # network errors, 404, auth...
        raise ModelUnavailableError(
            f"downloading {spec} failed: {exc}\n{offline_instructions(repo)}"
        ) from exc


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a model's weights, cheap even for 600 MB files.

    Hashes the config plus the size, head and tail of the weights file:
    different trainings or architectures never collide in practice, and a
    restart does not re-read the whole file.
    """
    digest = hashlib.sha256((model_dir / CONFIG_FILE).read_bytes())
    for name in WEIGHT_FILES:
        path = model_dir / name
        if path.is_file():
            size = path.stat().st_size
            digest.update(f"{name}:{size}".encode())
            with path.open("rb") as f:
                digest.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                digest.update(f.read(1 << 20))
            break
    return digest.hexdigest()[:16]


@dataclass
class LoadedModel:
    """A frozen open_clip model plus what clients and caches need to know of it."""

    spec: str
    model_dir: Path
    fingerprint: str
    model: object  # open_clip.CLIP
    tokenizer: object
    embedding_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    load_seconds: float

    def encode_text(self, prompts: list[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised text embeddings [N, D] (float32)."""
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                tokens = self.tokenizer(prompts[start : start + batch_size])
                emb = self.model.encode_text(tokens).float()
                chunks.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
        if not chunks:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32)


@contextmanager
def skipping_random_init() -> Iterator[None]:
    """Build modules without drawing random initial weights.

    A checkpoint that open_clip loads strictly overwrites every parameter, so
    the random draw is wasted: for ViT-L-14 it is most of the load time on a
    small CPU. The initialisers are swapped for no-ops only while one model is
    built (a lock keeps two loads from interleaving), as Hugging Face's
    ``no_init_weights`` does.
    """
    import torch

    def keep(tensor, *args, **kwargs):
        return tensor

    with _INIT_LOCK:
        saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
        try:
            for name in saved:
                setattr(torch.nn.init, name, keep)
            yield
        finally:
            for name, fn in saved.items():
                setattr(torch.nn.init, name, fn)


def has_weights(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in WEIGHT_FILES)


def load_model(spec: str = DEFAULT_MODEL) -> LoadedModel:
    import open_clip
    import torch

    started = time.perf_counter()
    model_dir = resolve_model_dir(spec)
    config = json.loads((model_dir / CONFIG_FILE).read_text("utf-8"))
    preprocess_cfg = config.get("preprocess_cfg", {})
    if not has_weights(model_dir):
        raise ModelUnavailableError(
            f"{spec}: {model_dir} has {CONFIG_FILE} but no weights ({', '.join(WEIGHT_FILES)})"
        )
    with skipping_random_init():  # the checkpoint is loaded strictly over every tensor
        model = open_clip.create_model(f"{LOCAL_PREFIX}{model_dir}", device="cpu")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(f"{LOCAL_PREFIX}{model_dir}")
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, tuple | list) else int(image_size)
    with torch.inference_mode():
        dim = int(model.encode_text(tokenizer(["probe"])).shape[-1])
    return LoadedModel(
        spec=spec,
        model_dir=model_dir,
        fingerprint=model_fingerprint(model_dir),
        model=model,
        tokenizer=tokenizer,
        embedding_dim=dim,
        image_size=image_size,
        mean=tuple(preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        load_seconds=time.perf_counter() - started,
    )
