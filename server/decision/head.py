"""The MLP head for the common species (the seed's, docs/seed-v4.md "Head", by default).

Built from the bundle's ``head`` config so a retrained head with other widths
loads without code changes. It never changes at runtime: new species go
through prototypes, not through this head.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from biolit_id.server.decision.bundle import DEFAULT_HEAD


def build_head(input_dim: int, num_classes: int, config: dict | None = None) -> nn.Sequential:
    """Sequential whose state keys are the seed's without its ``net.`` prefix (``0.*``,
    ``1.*``, ``4.*``, ``7.*``), so the seed's weights load strictly."""
    config = config or DEFAULT_HEAD
    hidden = list(config.get("hidden", DEFAULT_HEAD["hidden"]))
    dropout = list(config.get("dropout", [0.0] * len(hidden)))
    layers: list[nn.Module] = [nn.LayerNorm(input_dim)] if config.get("layernorm", True) else []
    width = input_dim
    for size, p in zip(hidden, dropout, strict=True):
        layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(p)]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class Head:
    """Inference wrapper: embeddings in, logits over the common species out (the
    scorer applies the softmax, masked when a request restricts the species)."""

    def __init__(self, state: dict[str, np.ndarray], input_dim: int, num_classes: int,
                 config: dict | None = None) -> None:
        self.net = build_head(input_dim, num_classes, config)
        self.net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        self.net.eval()
        self.num_classes = num_classes

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
            return self.net(x).double().numpy()


def head_state_from_module(net: nn.Sequential) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()}
