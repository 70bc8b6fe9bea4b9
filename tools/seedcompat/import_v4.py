"""The seed's first generation (BioCLIP, docs/seed-v4.md) read from its torch pickles into a bundle.

Unpickling runs whatever code a file names, so they are read with
``weights_only=True`` and a minimal allow-list. Weights, thresholds and names
are kept exactly; text prototypes are remade from the model.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biolit_id.cli.seedcompat.formats import (
    SEED_PREPROCESSING,
    SeedImportError,
    numpy_reconstruct,
    safe_torch_load,
)
from biolit_id.cli.training.rank_thresholds import simulated_rank_thresholds
from biolit_id.index.core.digest import file_sha256
from biolit_id.index.core.vectors import fuse_prototypes
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import DEFAULT_HEAD, Bundle
from biolit_id.server.decision.types import Thresholds

log = logging.getLogger(__name__)

HEAD_PREFIX = "net."
# docs/seed-v4.md, "Proto-CLIP fusion": the seed's text for a species without a description.
GENERIC_PROMPT = "a photo of {name}, marine species on rocky coastal shore"
# ------------------------------------------------------------------ loading


def seed_safe_globals() -> list:
    """Exactly the non-torch globals ``prototypes_v4.pt`` names, nothing more.

    numpy arrays pickle as ``_reconstruct(ndarray, shape, dtype)`` plus their
    dtype class.
    """
    return [numpy_reconstruct(), np.ndarray, np.dtype, np.dtypes.Float32DType]


def load_seed_file(path: Path) -> dict:
    """A seed pickle as a dict, without ever executing code from the file."""
    return safe_torch_load(path, seed_safe_globals())


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _ordered_names(mapping: dict, what: str) -> list[str]:
    """``idx_to_species`` -> names in index order, insisting on 0..n-1."""
    try:
        indices = sorted(int(k) for k in mapping)
    except (TypeError, ValueError):
        raise SeedImportError(f"{what}: idx_to_species keys are not integers") from None
    if indices != list(range(len(indices))):
        raise SeedImportError(f"{what}: idx_to_species indices are not 0..{len(indices) - 1}")
    by_int = {int(k): str(v) for k, v in mapping.items()}
    names = [by_int[i] for i in range(len(indices))]
    if len(set(names)) != len(names):
        raise SeedImportError(f"{what}: duplicate species names in idx_to_species")
    return names


@dataclass
class SeedArtifacts:
    """The two seed files, unpacked and checked."""

    common: list[str]  # head output order
    species: list[str]  # prototype row order
    head_state: dict[str, np.ndarray]
    visual_prototypes: np.ndarray
    whitening_mu: np.ndarray
    whitening_W: np.ndarray
    temperature: float
    alpha: float
    thresholds: Thresholds
    feature_dim: int
    source: dict = field(default_factory=dict)


def read_seed(classifier_path: Path, prototypes_path: Path) -> SeedArtifacts:
    clf = load_seed_file(classifier_path)
    protos = load_seed_file(prototypes_path)
    for key in ("classifier_state_dict", "idx_to_species"):
        if key not in clf:
            raise SeedImportError(f"{classifier_path} lacks {key!r}")
    for key in ("prototypes", "whitening_mu", "whitening_W", "temperature", "alpha",
                "seuil_top50", "seuil_proto", "idx_to_species"):
        if key not in protos:
            raise SeedImportError(f"{prototypes_path} lacks {key!r}")

    state = clf["classifier_state_dict"]
    foreign = [k for k in state if not k.startswith(HEAD_PREFIX)]
    if foreign:
        raise SeedImportError(f"{classifier_path}: unexpected head keys {foreign[:5]}")
    head_state = {
        k[len(HEAD_PREFIX):]: _as_numpy(v).astype(np.float32) for k, v in state.items()
    }
    common = _ordered_names(clf["idx_to_species"], str(classifier_path))
    species = _ordered_names(protos["idx_to_species"], str(prototypes_path))
    known = set(species)
    missing = [n for n in common if n not in known]
    if missing:
        raise SeedImportError(
            f"{len(missing)} classifier species have no prototype in {prototypes_path}: {missing}"
        )

    visual = _as_numpy(protos["prototypes"]).astype(np.float32)
    mu = _as_numpy(protos["whitening_mu"]).astype(np.float32).reshape(1, -1)
    w = _as_numpy(protos["whitening_W"]).astype(np.float32)
    feature_dim = int(clf.get("feature_dim", mu.shape[1]))
    if visual.shape[0] != len(species):
        raise SeedImportError(f"{visual.shape[0]} prototypes for {len(species)} species")
    if w.shape != (mu.shape[1], visual.shape[1]) or mu.shape[1] != feature_dim:
        raise SeedImportError(
            f"whitening shapes mu {mu.shape}, W {w.shape} do not fit {feature_dim}-d "
            f"embeddings and {visual.shape[1]}-d prototypes"
        )
    _check_head(head_state, feature_dim, len(common))
    seuil_top50, seuil_proto = float(protos["seuil_top50"]), float(protos["seuil_proto"])
    return SeedArtifacts(
        common=common,
        species=species,
        head_state=head_state,
        visual_prototypes=visual,
        whitening_mu=mu,
        whitening_W=w,
        temperature=float(protos["temperature"]),
        alpha=float(protos["alpha"]),
        thresholds=Thresholds(
            classifier_high=seuil_top50, classifier_low=seuil_proto, prototype=seuil_proto
        ),
        feature_dim=feature_dim,
        source={
            "kind": "biolit-seed",
            "classifier": _file_info(classifier_path, clf),
            "prototypes": _file_info(prototypes_path, protos),
        },
    )


def _file_info(path: Path, data: dict) -> dict:
    info = {"file": Path(path).name, "sha256": file_sha256(path)}
    if "val_acc" in data:
        info["val_acc"] = float(data["val_acc"])  # the seed's own record, not re-measured
    return info


def _check_head(state: dict[str, np.ndarray], input_dim: int, num_classes: int) -> None:
    """The weights must load, strictly, into the architecture the server builds."""
    from biolit_id.server.decision.head import Head

    try:
        Head(state, input_dim, num_classes, DEFAULT_HEAD)
    except RuntimeError as exc:
        raise SeedImportError(f"the seed's head does not fit {DEFAULT_HEAD}: {exc}") from exc


# ------------------------------------------------------------------ prompts


def read_prompts_csv(path: Path) -> dict[str, str]:
    """``species,prompt`` rows (header required)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"species", "prompt"} <= set(reader.fieldnames):
            raise SeedImportError(f"{path}: expected a header with columns species,prompt")
        prompts: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            name, prompt = (row["species"] or "").strip(), (row["prompt"] or "").strip()
            if not name or not prompt:
                raise SeedImportError(f"{path}:{line}: empty species or prompt")
            if name in prompts:
                raise SeedImportError(f"{path}:{line}: {name!r} appears twice")
            prompts[name] = prompt
    return prompts


def choose_prompts(species: list[str], catalog: Catalog,
                   custom: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    """One prompt per species and where each came from (file, catalog or generic)."""
    custom = custom or {}
    unknown = sorted(set(custom) - set(species))
    if unknown:
        raise SeedImportError(f"--prompts names species the seed does not have: {unknown}")
    prompts, origin = [], {}
    for name in species:
        record = catalog.get(name)
        if name in custom:
            prompts.append(custom[name])
            origin[name] = "file"
        elif record is not None:
            prompts.append(record.prompt())
            origin[name] = "catalog"
        else:
            prompts.append(GENERIC_PROMPT.format(name=name))
            origin[name] = "generic"
    return prompts, origin


# ------------------------------------------------------------------ import


def import_seed(classifier: Path, prototypes: Path, model_spec: str,
                prompts_csv: Path | None = None, catalog: Catalog | None = None,
                model=None) -> Bundle:
    """The bundle, not yet saved. ``model`` may be a LoadedModel already in memory."""
    from biolit_id.server.inference.model_loader import load_model

    seed = read_seed(classifier, prototypes)
    catalog = catalog or Catalog.load_default()
    not_in_catalog = [n for n in seed.species if n not in catalog]
    custom = read_prompts_csv(prompts_csv) if prompts_csv else None
    prompts, origin = choose_prompts(seed.species, catalog, custom)

    model = model or load_model(model_spec)
    if model.embedding_dim != seed.feature_dim:
        raise SeedImportError(
            f"the seed works on {seed.feature_dim}-d embeddings; {model_spec} gives "
            f"{model.embedding_dim}-d"
        )
    bundle = Bundle(
        model_id=model.spec,
        model_fingerprint=model.fingerprint,
        embedding_dim=model.embedding_dim,
        species=list(seed.species),
        common=list(seed.common),
        head_config=dict(DEFAULT_HEAD),
        head_state=seed.head_state,
        visual_prototypes=seed.visual_prototypes,
        text_prototypes=np.zeros_like(seed.visual_prototypes),
        prototypes=np.zeros_like(seed.visual_prototypes),
        whitening_mu=seed.whitening_mu,
        whitening_W=seed.whitening_W,
        temperature=seed.temperature,
        alpha=seed.alpha,
        thresholds=seed.thresholds,
        preprocessing=dict(SEED_PREPROCESSING),
    )
    # docs/seed-v4.md, "Proto-CLIP fusion": normalised text embedding, whitened, normalised.
    bundle.text_prototypes = bundle.whiten(model.encode_text(prompts))
    bundle.prototypes = fuse_prototypes(bundle.visual_prototypes, bundle.text_prototypes,
                                        bundle.alpha)
    norms = np.linalg.norm(seed.visual_prototypes, axis=1)
    bundle.extra = {
        "source": {
            **seed.source,
            "visual_prototypes_max_norm_error": float(np.abs(norms - 1.0).max()),
        },
        "prompts": {
            "source": str(prompts_csv) if prompts_csv else "catalog",
            "by_species": {"file": _count(origin, "file"), "catalog": _count(origin, "catalog"),
                           "generic": _count(origin, "generic")},
            "generic": [n for n, o in origin.items() if o == "generic"],
        },
        "catalog_missing": not_in_catalog,
    }
    # No calibration set comes with the seed: the default rank thresholds, simulated around
    # the bundle's own prototypes (docs/taxonomy.md, "Rank thresholds").
    derived = simulated_rank_thresholds(bundle, catalog)
    bundle.taxon_thresholds = derived.thresholds
    bundle.extra["rank_thresholds"] = derived.report
    return bundle


def _count(origin: dict[str, str], kind: str) -> int:
    return sum(1 for o in origin.values() if o == kind)
