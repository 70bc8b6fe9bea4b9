"""Eager PyTorch: the reference every other runtime is gated against."""

from __future__ import annotations

import copy

import numpy as np

from biolit_id.index.core.vectors import l2_normalize
from biolit_id.server.inference.model_loader import LoadedModel


class TorchEmbedder:
    """open_clip's image tower in eager PyTorch, fp32 or bf16."""

    runtime = "torch"

    def __init__(self, loaded: LoadedModel, precision: str = "fp32") -> None:
        import torch  # heavy: only once an embedder is actually built

        if precision not in {"fp32", "bf16"}:
            raise ValueError(f"torch runtime supports fp32 and bf16, not {precision}")
        self.precision = precision
        self.embedding_dim = loaded.embedding_dim
        self._dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        visual = loaded.model.visual
        # bf16 on a copy: the text tower and other users keep fp32 weights.
        if precision == "bf16":
            visual = copy.deepcopy(visual).to(torch.bfloat16)
        self._visual = visual.eval()

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
            out = self._visual(x.to(self._dtype)).float().numpy()
        return l2_normalize(out)
