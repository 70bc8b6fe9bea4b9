"""The one interface every runtime implements, and the names of the choices.

The service, the offline tools and the benchmark only see ``Embedder``, so a
runtime (``--runtime torch|onnx|openvino|openvino-throughput``) or precision (``--precision
fp32|bf16|int8``) can change without touching anything else.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Protocol

import numpy as np

RUNTIMES = ("torch", "onnx", "openvino", "openvino-throughput")
PRECISIONS = ("fp32", "bf16", "int8")


class RuntimeUnavailableError(RuntimeError):
    """A runtime/precision cannot run here; the message says what to install or pick."""


class Embedder(Protocol):
    runtime: str
    precision: str
    embedding_dim: int

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """[B, 3, H, W] float32 -> [B, D] float32, rows of unit norm."""
        ...


def require(module: str, extra: str) -> ModuleType:
    """Import an optional runtime package, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeUnavailableError(
            f"{module} is not installed; install it with: pip install 'biolit-id[{extra}]'"
        ) from None
