"""The model bundle: everything trained, in a directory with no pickle in it.

``manifest.json`` says what the tensors mean and which model made them;
``weights.safetensors`` holds named tensors (``visual_prototypes``,
``text_prototypes``, ``prototypes``, ``whitening_mu``, ``whitening_W``,
``head.*``). Loading a bundle made for another model or embedding dimension
is refused: its prototypes and head would silently score garbage.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biolit_id.index.core.atomic import atomic_write
from biolit_id.index.core.digest import file_sha256
from biolit_id.index.core.vectors import SEED_ITERATIONS
from biolit_id.server.decision.types import Thresholds

FORMAT = "biolit-id-bundle/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TOOL_VERSION = "0.1.0"
# The seed's head (docs/seed-v4.md, "Head"):
# LayerNorm, 512->512, GELU, Dropout .5, 512->256, GELU, Dropout .25, ->C
DEFAULT_HEAD = {"type": "mlp", "hidden": [512, 256], "dropout": [0.5, 0.25], "layernorm": True}


class BundleError(ValueError):
    """A bundle that cannot be used; the message says why."""


@dataclass
class Bundle:
    model_id: str
    model_fingerprint: str
    embedding_dim: int
    species: list[str]
    common: list[str]  # head classes, in head output order
    head_config: dict
    head_state: dict[str, np.ndarray]
    visual_prototypes: np.ndarray  # [S, P]
    text_prototypes: np.ndarray  # [S, P]
    prototypes: np.ndarray  # [S, P] fused
    whitening_mu: np.ndarray | None  # [1, D]
    whitening_W: np.ndarray | None  # [D, P]
    temperature: float
    alpha: float
    thresholds: Thresholds
    taxon_thresholds: dict[str, float] = field(default_factory=dict)
    # Decision rule (server.decision.registry.ROUTINGS): "seed" (the cascade; bundles without the
    # key), "fused" (one calibrated distribution, what train writes); "fusion" its weights.
    routing: str = "seed"
    fusion: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # free-form manifest keys (split, source...)
    extra_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    created_at: str = ""
    training_fingerprint: str = ""
    bundle_id: str = ""

    @property
    def prototype_dim(self) -> int:
        return int(self.prototypes.shape[1])

    @property
    def prototype_iterations(self) -> int:
        """The visual-prototype recipe (0: class means; n: the seed's n similarity-weighted
        refinements), which photos added at runtime follow too; the seed's by default."""
        training = self.extra.get("training") or {}
        return int(training.get("prototype_iterations", SEED_ITERATIONS))

    def common_to_global(self, names: Sequence[str] | None = None) -> np.ndarray:
        """Row of each head class in ``names`` (default: the bundle's species).

        The service passes its live prototype names, which may have grown by
        AddSpecies since the bundle was made.
        """
        index = {name: i for i, name in enumerate(self.species if names is None else names)}
        return np.array([index[name] for name in self.common], dtype=np.int64)

    def whiten(self, embeddings: np.ndarray) -> np.ndarray:
        """Raw L2-normalised embeddings -> the prototype space (normalised)."""
        x = np.asarray(embeddings, dtype=np.float32)
        if self.whitening_W is not None:
            x = (x - self.whitening_mu) @ self.whitening_W
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    # ---------------------------------------------------------------- saving

    def tensors(self) -> dict[str, np.ndarray]:
        out = {
            "visual_prototypes": self.visual_prototypes,
            "text_prototypes": self.text_prototypes,
            "prototypes": self.prototypes,
            **{f"head.{k}": v for k, v in self.head_state.items()},
            **self.extra_tensors,
        }
        if self.whitening_W is not None:
            out["whitening_mu"] = self.whitening_mu
            out["whitening_W"] = self.whitening_W
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}

    def manifest(self) -> dict:
        common = set(self.common)
        return {
            "format": FORMAT,
            "model_id": self.model_id,
            "model_fingerprint": self.model_fingerprint,
            "embedding_dim": self.embedding_dim,
            "preprocessing": self.preprocessing,
            "species": [
                {"index": i, "name": n, "common": n in common} for i, n in enumerate(self.species)
            ],
            "common": list(self.common),
            "rare": [n for n in self.species if n not in common],
            "head": self.head_config,
            "thresholds": {
                "classifier_high": self.thresholds.classifier_high,
                "classifier_low": self.thresholds.classifier_low,
                "prototype": self.thresholds.prototype,
                "zero_shot": self.thresholds.zero_shot,
                "taxon": self.taxon_thresholds,
                "answer": self.thresholds.answer,
                **({"answer_rare": self.thresholds.answer_rare}
                   if self.thresholds.answer_rare is not None else {}),
                **({"answer_runtime": self.thresholds.answer_runtime}
                   if self.thresholds.answer_runtime is not None else {}),
            },
            "routing": self.routing,
            **({"fusion": self.fusion} if self.fusion else {}),
            "temperature": self.temperature,
            "alpha": self.alpha,
            "whitening": {
                "input_dim": self.embedding_dim,
                "output_dim": self.prototype_dim if self.whitening_W is not None else None,
            },
            "training_data_fingerprint": self.training_fingerprint,
            "metrics": self.metrics,
            "created_at": self.created_at or _now(),
            "tool_version": TOOL_VERSION,
            **self.extra,
        }

    def save(self, directory: Path) -> Path:
        """Write each file atomically (temp, fsync, rename).

        A crash between the two renames leaves new weights beside the old
        manifest; ``load_bundle`` then refuses the pair (bundle_id differs)
        rather than serving a mix.
        """
        from safetensors.numpy import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / WEIGHTS, save(self.tensors()))
        self.bundle_id = file_sha256(directory / WEIGHTS)[:16]
        manifest = self.manifest()
        manifest["bundle_id"] = self.bundle_id
        atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))
        return directory


def load_bundle(
    directory: Path,
    expect_fingerprint: str | None = None,
    expect_dim: int | None = None,
) -> Bundle:
    from safetensors.numpy import load_file

    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text("utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{directory} is not a bundle: {MANIFEST} is missing") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{directory / MANIFEST} is corrupt: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{directory}: unknown bundle format {manifest.get('format')!r}")
    weights_path = directory / WEIGHTS
    try:
        tensors = load_file(str(weights_path))
    except FileNotFoundError:
        raise BundleError(f"{directory}: {WEIGHTS} is missing") from None
    except Exception as exc:
        raise BundleError(f"{weights_path} is corrupt: {exc}") from None
    recorded_id = manifest.get("bundle_id")
    if recorded_id and recorded_id != file_sha256(weights_path)[:16]:
        raise BundleError(f"{weights_path} does not match its manifest (bundle_id differs)")

    dim = int(manifest["embedding_dim"])
    if expect_dim is not None and dim != expect_dim:
        raise BundleError(
            f"bundle {directory} was made for {dim}-d embeddings, the model gives {expect_dim}-d"
        )
    fingerprint = manifest.get("model_fingerprint", "")
    if expect_fingerprint is not None and fingerprint != expect_fingerprint:
        raise BundleError(
            f"bundle {directory} was made for model {manifest.get('model_id')!r} "
            f"(fingerprint {fingerprint}), not the loaded one ({expect_fingerprint}); "
            "retrain or re-import it with --model set to the serving model"
        )

    species = [s["name"] for s in sorted(manifest["species"], key=lambda s: s["index"])]
    for key in ("visual_prototypes", "text_prototypes", "prototypes"):
        if key not in tensors:
            raise BundleError(f"{weights_path} lacks tensor {key!r}")
        if tensors[key].shape[0] != len(species):
            raise BundleError(f"{key} has {tensors[key].shape[0]} rows for {len(species)} species")
    _check_consistent(directory, species, manifest.get("common", []), tensors, dim)
    th = manifest.get("thresholds", {})
    known = {"visual_prototypes", "text_prototypes", "prototypes", "whitening_mu", "whitening_W"}
    return Bundle(
        model_id=manifest.get("model_id", ""),
        model_fingerprint=fingerprint,
        embedding_dim=dim,
        species=species,
        common=list(manifest.get("common", [])),
        head_config=manifest.get("head") or {},
        head_state={k[5:]: v for k, v in tensors.items() if k.startswith("head.")},
        visual_prototypes=tensors["visual_prototypes"],
        text_prototypes=tensors["text_prototypes"],
        prototypes=tensors["prototypes"],
        whitening_mu=tensors.get("whitening_mu"),
        whitening_W=tensors.get("whitening_W"),
        temperature=float(manifest["temperature"]),
        alpha=float(manifest["alpha"]),
        thresholds=Thresholds(
            classifier_high=float(th.get("classifier_high", 0.8)),
            classifier_low=float(th.get("classifier_low", 0.4)),
            prototype=float(th.get("prototype", 0.4)),
            zero_shot=float(th.get("zero_shot", Thresholds().zero_shot)),
            answer=float(th.get("answer", Thresholds().answer)),
            answer_rare=_optional_float(th.get("answer_rare")),
            answer_runtime=_optional_float(th.get("answer_runtime")),
        ),
        taxon_thresholds={k: float(v) for k, v in (th.get("taxon") or {}).items()},
        routing=str(manifest.get("routing") or "seed"),
        fusion=manifest.get("fusion") or {},
        preprocessing=manifest.get("preprocessing") or {},
        metrics=manifest.get("metrics") or {},
        extra={k: v for k, v in manifest.items() if k not in _MANIFEST_KEYS},
        extra_tensors={
            k: v for k, v in tensors.items() if k not in known and not k.startswith("head.")
        },
        created_at=manifest.get("created_at", ""),
        training_fingerprint=manifest.get("training_data_fingerprint", ""),
        bundle_id=recorded_id or file_sha256(weights_path)[:16],
    )


_MANIFEST_KEYS = frozenset(
    (
        "format", "model_id", "model_fingerprint", "embedding_dim", "preprocessing", "species",
        "common", "rare", "head", "thresholds", "temperature", "alpha", "whitening",
        "training_data_fingerprint", "metrics", "created_at", "tool_version", "bundle_id",
        "routing", "fusion",
    )
)


def _check_consistent(directory: Path, species: list[str], common: list[str],
                      tensors: dict[str, np.ndarray], dim: int) -> None:
    """Refuse at load what would otherwise fail on the first Identify."""
    unknown = sorted(set(common) - set(species))
    if unknown:
        raise BundleError(f"bundle {directory}: head classes missing from its species: {unknown}")
    width = tensors["prototypes"].shape[1]
    for key in ("visual_prototypes", "text_prototypes"):
        if tensors[key].shape[1] != width:
            raise BundleError(f"bundle {directory}: {key} is {tensors[key].shape[1]}-d, "
                              f"prototypes are {width}-d")
    mu, w = tensors.get("whitening_mu"), tensors.get("whitening_W")
    if (mu is None) != (w is None):
        raise BundleError(f"bundle {directory}: whitening_mu and whitening_W go together")
    if w is not None and (w.shape != (dim, width) or mu.shape != (1, dim)):
        raise BundleError(f"bundle {directory}: whitening maps {tuple(w.shape)} / "
                          f"{tuple(mu.shape)}, expected ({dim}, {width}) / (1, {dim})")
    if w is None and width != dim:
        raise BundleError(f"bundle {directory}: {width}-d prototypes need a whitening "
                          f"from the {dim}-d embeddings")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _optional_float(value) -> float | None:
    return None if value is None else float(value)
