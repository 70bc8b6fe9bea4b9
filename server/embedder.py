"""Image embedders: preprocessed pixels -> L2-normalised embeddings.

One small interface so the service, the offline tools and the benchmark can
swap runtimes (``--runtime torch|onnx|openvino``, ``--precision
fp32|bf16|int8``) without touching anything else. The torch runtime lives
here; exported runtimes are in ``server/runtimes.py``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from biolit_id.core.vectors import l2_normalize
from biolit_id.server.model_loader import LoadedModel

RUNTIMES = ("torch", "onnx", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")


class Embedder(Protocol):
    runtime: str
    precision: str
    embedding_dim: int

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """[B, 3, H, W] float32 -> [B, D] float32, rows of unit norm."""
        ...


class TorchEmbedder:
    """open_clip's image tower in eager PyTorch, fp32 or bf16."""

    runtime = "torch"

    def __init__(self, loaded: LoadedModel, precision: str = "fp32") -> None:
        import torch

        if precision not in {"fp32", "bf16"}:
            raise ValueError(f"torch runtime supports fp32 and bf16, not {precision}")
        self.precision = precision
        self.embedding_dim = loaded.embedding_dim
        self._dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        visual = loaded.model.visual
        # bf16 on a copy: the text tower and other users keep fp32 weights.
        if precision == "bf16":
            import copy

            visual = copy.deepcopy(visual).to(torch.bfloat16)
        self._visual = visual.eval()

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
            out = self._visual(x.to(self._dtype)).float().numpy()
        return l2_normalize(out)


def make_embedder(
    loaded: LoadedModel,
    runtime: str = "torch",
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> Embedder:
    if runtime == "torch":
        return TorchEmbedder(loaded, precision)
    if runtime in {"onnx", "openvino"}:
        from biolit_id.server.runtimes import make_exported_embedder

        return make_exported_embedder(loaded, runtime, precision, cache_dir)
    raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
