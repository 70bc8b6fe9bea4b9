"""Per-rank heads: one small MLP per taxonomic rank, on the whitened features.

The architecture is the BioLit seed v2's ``LevelMLP`` (docs/seed-v2.md,
"The decision, in our words"): Linear(P -> H), BatchNorm1d(H) in eval mode, ReLU,
Dropout (identity at inference), Linear(H -> C), softmax. Imported v2 heads
and the heads ``biolit-id train --rank-heads`` fits share this module, so one
forward pass (float64 numpy) serves both.

In a bundle: tensors ``rank_heads.<rank>.<layer>.<name>`` with the torch
``nn.Sequential`` state-dict names (``0.weight`` ... ``4.bias``), and a
manifest section ``rank_heads`` with each rank's labels (head output order),
the BatchNorm epsilon and where the heads came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

TENSOR_PREFIX = "rank_heads."
MANIFEST_KEY = "rank_heads"
BN_EPS = 1e-5  # torch's BatchNorm1d default; the seed did not change it
# The tensors of one head, in nn.Sequential(Linear, BatchNorm1d, ReLU, Dropout, Linear) names.
LAYER_KEYS = ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
              "4.weight", "4.bias")
# Ranks a head may predict, coarsest first (catalog rank names).
HEAD_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus")


class RankHeadError(ValueError):
    """Rank-head tensors or labels that do not fit together; the message says how."""


def hidden_width(num_classes: int) -> int:
    """The seed's rule: H = max(256, 8 C)."""
    return max(256, 8 * int(num_classes))


@dataclass(frozen=True)
class RankHead:
    rank: str
    labels: tuple[str, ...]
    state: Mapping[str, np.ndarray]  # LAYER_KEYS -> float32 arrays
    eps: float = BN_EPS

    def __post_init__(self) -> None:
        missing = [k for k in LAYER_KEYS if k not in self.state]
        if missing:
            raise RankHeadError(f"{self.rank} head lacks tensors {missing}")
        w0, w4 = self.state["0.weight"], self.state["4.weight"]
        hidden = w0.shape[0]
        shapes = {"0.bias": (hidden,), "1.weight": (hidden,), "1.bias": (hidden,),
                  "1.running_mean": (hidden,), "1.running_var": (hidden,),
                  "4.weight": (len(self.labels), hidden), "4.bias": (len(self.labels),)}
        for key, shape in shapes.items():
            if tuple(self.state[key].shape) != shape:
                raise RankHeadError(f"{self.rank} head: {key} is {tuple(self.state[key].shape)}, "
                                    f"expected {shape} ({len(self.labels)} labels, H={hidden})")
        if w4.shape[1] != hidden or len(set(self.labels)) != len(self.labels):
            raise RankHeadError(f"{self.rank} head: duplicate labels or inconsistent widths")

    @property
    def input_dim(self) -> int:
        return int(self.state["0.weight"].shape[1])

    def logits(self, features: np.ndarray) -> np.ndarray:
        """[B, P] whitened unit features -> [B, C] logits (float64)."""
        s = {k: np.asarray(v, dtype=np.float64) for k, v in self.state.items()}
        x = np.asarray(features, dtype=np.float64)
        h = x @ s["0.weight"].T + s["0.bias"]
        h = (h - s["1.running_mean"]) / np.sqrt(s["1.running_var"] + self.eps)
        h = np.maximum(s["1.weight"] * h + s["1.bias"], 0.0)
        return h @ s["4.weight"].T + s["4.bias"]

    def probabilities(self, features: np.ndarray, allowed: np.ndarray | None = None
                      ) -> np.ndarray:
        """Softmax over the labels; with ``allowed`` it renormalises over those only."""
        z = self.logits(features)
        if allowed is not None:
            if not allowed.any():
                return np.zeros_like(z)
            z = np.where(allowed[None, :], z, -np.inf)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class RankHeads:
    """The heads of one bundle, coarsest rank first."""

    heads: Mapping[str, RankHead]
    source: str  # "seed-v2" (imported) or "train"
    extra: Mapping[str, object] | None = None  # e.g. training rows per rank

    def __post_init__(self) -> None:
        dims = {h.input_dim for h in self.heads.values()}
        if len(dims) > 1:
            raise RankHeadError(f"rank heads take different input widths: {sorted(dims)}")
        unknown = [r for r in self.heads if r not in HEAD_RANKS]
        if unknown:
            raise RankHeadError(f"no such rank for a head: {unknown} (known: {HEAD_RANKS})")

    @property
    def ranks(self) -> tuple[str, ...]:
        return tuple(r for r in HEAD_RANKS if r in self.heads)

    def probabilities(self, features: np.ndarray,
                      allowed: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        allowed = allowed or {}
        return {r: self.heads[r].probabilities(features, allowed.get(r)) for r in self.ranks}

    # ------------------------------------------------------------ bundle I/O

    def tensors(self) -> dict[str, np.ndarray]:
        return {f"{TENSOR_PREFIX}{rank}.{key}": np.asarray(head.state[key], dtype=np.float32)
                for rank, head in self.heads.items() for key in LAYER_KEYS}

    def manifest(self) -> dict:
        return {
            "source": self.source,
            "architecture": "Linear-BatchNorm1d-ReLU-Dropout-Linear",
            "bn_eps": next(iter(self.heads.values())).eps if self.heads else BN_EPS,
            "ranks": list(self.ranks),
            "labels": {r: list(self.heads[r].labels) for r in self.ranks},
            **({"extra": dict(self.extra)} if self.extra else {}),
        }

    def attach(self, bundle) -> None:
        """Store the heads in a (not yet saved) bundle, replacing any it had."""
        bundle.extra_tensors = {k: v for k, v in bundle.extra_tensors.items()
                                if not k.startswith(TENSOR_PREFIX)}
        bundle.extra_tensors.update(self.tensors())
        bundle.extra[MANIFEST_KEY] = self.manifest()

    @classmethod
    def from_bundle(cls, bundle) -> RankHeads | None:
        """The bundle's heads, or None when it has none."""
        section = (bundle.extra or {}).get(MANIFEST_KEY)
        if not section:
            return None
        eps = float(section.get("bn_eps", BN_EPS))
        heads = {}
        for rank in section.get("ranks", []):
            prefix = f"{TENSOR_PREFIX}{rank}."
            state = {k[len(prefix):]: v for k, v in bundle.extra_tensors.items()
                     if k.startswith(prefix)}
            heads[rank] = RankHead(rank, tuple(section["labels"][rank]), state, eps)
        if heads and next(iter(heads.values())).input_dim != bundle.prototype_dim:
            raise RankHeadError(
                f"rank heads take {next(iter(heads.values())).input_dim}-d features, the "
                f"bundle's prototype space is {bundle.prototype_dim}-d")
        return cls(heads, str(section.get("source", "")), section.get("extra"))
