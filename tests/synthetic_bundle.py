"""Small hybrid bundles with chosen prototypes, for tests that need a real SeedCascadeScorer.

The prototypes live in the raw embedding space (no whitening), so a test can
send a prototype, or a point between two, as the request's ``embedding`` and
know what the scorer sees. The head is the real MLP with seeded random weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from biolit_id.index.core.vectors import fuse_prototypes
from biolit_id.server.decision.bundle import DEFAULT_HEAD, Bundle
from biolit_id.server.decision.head import build_head, head_state_from_module
from biolit_id.server.decision.types import Thresholds


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_bundle(
    directory: Path,
    model,
    species: Sequence[str],
    prototypes: np.ndarray,
    common: Sequence[str] = (),
    thresholds: Thresholds | None = None,
    taxon_thresholds: dict[str, float] | None = None,
    temperature: float = 30.0,
    seed: int = 0,
) -> Path:
    """Save a bundle for ``model`` (a LoadedModel) whose prototypes are ``prototypes``."""
    dim = model.embedding_dim
    protos = unit(prototypes)
    head_state: dict[str, np.ndarray] = {}
    if common:
        torch.manual_seed(seed)
        head_state = head_state_from_module(build_head(dim, len(common), DEFAULT_HEAD))
    bundle = Bundle(
        model_id=model.spec,
        model_fingerprint=model.fingerprint,
        embedding_dim=dim,
        species=list(species),
        common=list(common),
        head_config=dict(DEFAULT_HEAD),
        head_state=head_state,
        visual_prototypes=protos,
        text_prototypes=protos,
        prototypes=fuse_prototypes(protos, protos, 0.5),
        whitening_mu=None,
        whitening_W=None,
        temperature=temperature,
        alpha=0.5,
        thresholds=thresholds or Thresholds(),
        taxon_thresholds=dict(taxon_thresholds or {}),
        extra={"source": "synthetic test bundle"},
    )
    return bundle.save(directory)
