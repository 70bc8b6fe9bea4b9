"""``biolit-id import-seed --v2``: the seed's second generation (BioCLIP-2) as a bundle.

Three files (docs/seed-v2.md), each read without ever
running code from it:

* ``proto_model.npz``: ``np.load(allow_pickle=False)``: prototypes, the PCA
  whitening (mean, components, variance), temperature, alpha;
* ``mlp_model.pt``: ``torch.load(weights_only=True)`` with the five globals it
  needs beyond torch's own allow-listed (a LabelEncoder *stub* that keeps only
  ``classes_``, numpy's ``_reconstruct``, ``ndarray``, ``dtype`` and the object
  dtype class; no sklearn);
* ``tax_lookup.pkl``: every opcode is checked first (only plain data opcodes
  pass: no global, no call, no persistent id), then it is unpickled by an
  Unpickler whose ``find_class`` always refuses.

Kept exactly: prototypes, whitening (the variance division folded into one
[768, 256] matrix), temperature, the five heads and their label lists, the
seed's taxonomy; species names are given their proper form
(``lepas (anatifa) anatifera`` -> ``Lepas (Anatifa) anatifera``), the seed's
spelling is kept beside them for its CSV.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biolit_id.cli.seedcompat.formats import (
    SEED_PREPROCESSING,
    SeedImportError,
    numpy_reconstruct,
    safe_torch_load,
    seed_file,
)
from biolit_id.index.core.digest import file_sha256
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import Bundle
from biolit_id.server.decision.rank_heads import LAYER_KEYS, RankHead, RankHeadError, RankHeads
from biolit_id.server.decision.seed_v2 import (
    DEFAULT_MARGIN,
    DEFAULT_THRESHOLD,
    LEVEL_TO_RANK,
    MANIFEST_KEY,
    ROUTING,
    SeedV2Settings,
)
from biolit_id.server.decision.types import Thresholds

PROTO_KEYS = {"prototypes": 2, "species_list": 1, "wh_mean": 1, "wh_components": 2,
              "wh_variance": 1, "temperature": 1, "alpha": 1}
WHITEN_EPS = 1e-8  # apply_whitening: / sqrt(variance + 1e-8)
HEAD_PREFIX = "net."
# Opcodes of plain data: containers, strings, numbers, memo. Nothing that imports or calls.
DATA_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
    "BINFLOAT", "FLOAT", "BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4",
    "NONE", "NEWTRUE", "NEWFALSE",
    "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET",
})


# ------------------------------------------------------------------ safe readers


class LabelEncoderStub:
    """Stands in for ``sklearn.preprocessing.LabelEncoder``: keeps ``classes_``, no code."""

    classes_: np.ndarray

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict) or "classes_" not in state:
            raise pickle.UnpicklingError("a LabelEncoder without classes_")
        classes = state["classes_"]
        if not isinstance(classes, np.ndarray) or classes.ndim != 1 or not all(
                isinstance(c, str) for c in classes):
            raise pickle.UnpicklingError("LabelEncoder.classes_ is not a 1-d array of str")
        self.classes_ = classes


def classifier_safe_globals() -> list:
    """Exactly the globals ``mlp_model.pt`` names beyond torch's default allow-list."""
    return [
        (LabelEncoderStub, "sklearn.preprocessing._label.LabelEncoder"),
        numpy_reconstruct(),
        np.ndarray,
        np.dtype,
        np.dtypes.ObjectDType,
    ]


def load_classifier(path: Path) -> dict:
    return safe_torch_load(path, classifier_safe_globals())


def check_data_pickle(data: bytes, what: str) -> None:
    """Refuse a pickle with any opcode outside ``DATA_OPCODES`` (globals, calls, ids)."""
    try:
        for opcode, _arg, pos in pickletools.genops(data):
            if opcode.name not in DATA_OPCODES:
                raise SeedImportError(
                    f"{what}: refused, opcode {opcode.name} at byte {pos} can load a global "
                    "or run code; a taxonomy pickle needs only plain data")
    except (ValueError, EOFError) as exc:  # truncated or not a pickle at all
        raise SeedImportError(f"{what} is not a readable pickle: {exc}") from exc


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # the answer is always no
        raise pickle.UnpicklingError(f"global {module}.{name} refused")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids refused")


def read_tax_lookup(path: Path) -> dict[str, dict[str, str]]:
    """species -> {seed level -> taxon}, NaN ranks dropped, insertion order kept."""
    path = seed_file(path)
    data = path.read_bytes()
    check_data_pickle(data, str(path))
    try:
        raw = _NoGlobals(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise SeedImportError(f"{path} is not a readable pickle: {exc}") from exc
    if not isinstance(raw, dict):
        raise SeedImportError(f"{path} holds a {type(raw).__name__}, expected a dict")
    out: dict[str, dict[str, str]] = {}
    for name, ranks in raw.items():
        if not isinstance(name, str) or not isinstance(ranks, dict):
            raise SeedImportError(f"{path}: entry {name!r} is not species -> dict of ranks")
        clean = {}
        for level, value in ranks.items():
            if isinstance(value, float) and math.isnan(value):
                continue
            if not isinstance(value, str):
                raise SeedImportError(f"{path}: {name} {level} = {value!r} is not a name")
            clean[str(level)] = value
        out[name] = clean
    return out


def read_prototypes(path: Path) -> dict[str, np.ndarray]:
    path = seed_file(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except ValueError as exc:  # an object array needs pickle: refused
        raise SeedImportError(f"{path} was refused: {exc}") from exc
    except (OSError, EOFError) as exc:
        raise SeedImportError(f"{path} is not a readable .npz: {exc}") from exc
    for key, ndim in PROTO_KEYS.items():
        if key not in data:
            raise SeedImportError(f"{path} lacks {key!r}")
        if data[key].ndim != ndim:
            raise SeedImportError(f"{path}: {key} has {data[key].ndim} dimensions, not {ndim}")
    s, p = data["prototypes"].shape
    d = data["wh_mean"].shape[0]
    if (data["species_list"].shape != (s,) or data["wh_components"].shape != (p, d)
            or data["wh_variance"].shape != (p,)):
        raise SeedImportError(
            f"{path}: shapes do not fit: prototypes {data['prototypes'].shape}, species "
            f"{data['species_list'].shape}, components {data['wh_components'].shape}, "
            f"variance {data['wh_variance'].shape}, mean {data['wh_mean'].shape}")
    if np.any(data["wh_variance"] < 0) or not np.all(np.isfinite(data["prototypes"])):
        raise SeedImportError(f"{path}: negative variance or non-finite prototypes")
    return data


# ------------------------------------------------------------------ names


def proper_name(seed_name: str) -> str:
    """``lepas (anatifa) anatifera`` -> ``Lepas (Anatifa) anatifera``: genus and subgenus
    capitalised, epithets and ``subsp.`` as they are."""
    words = seed_name.strip().split()
    out = []
    for i, word in enumerate(words):
        if i == 0:
            word = word[:1].upper() + word[1:]
        elif word.startswith("(") and len(word) > 1:
            word = "(" + word[1:2].upper() + word[2:]
        out.append(word)
    return " ".join(out)


def names_for(species: list[str], catalog: Catalog) -> dict[str, str]:
    """seed spelling -> bundle name: the catalog's, matched without case, else proper form."""
    by_lower = {n.lower(): n for n in catalog.names()}
    return {s: by_lower.get(s.lower(), proper_name(s)) for s in species}


# ------------------------------------------------------------------ the import


@dataclass
class SeedV2Artifacts:
    species: list[str]  # the seed's spelling, prototype row order
    prototypes: np.ndarray
    mean: np.ndarray
    components: np.ndarray
    variance: np.ndarray
    temperature: float
    alpha: float
    heads: dict[str, tuple[tuple[str, ...], dict[str, np.ndarray]]]  # rank -> labels, state
    taxonomy: dict[str, dict[str, str]]  # seed spelling -> rank -> taxon
    source: dict = field(default_factory=dict)


def _heads_from(data: dict, path: Path, input_dim: int) -> dict:
    heads = {}
    for level, entry in data.items():
        rank = LEVEL_TO_RANK.get(level)
        if rank is None or rank == "species":
            raise SeedImportError(f"{path}: unknown head level {level!r}")
        if not isinstance(entry, dict) or not {"state_dict", "encoder"} <= set(entry):
            raise SeedImportError(f"{path}: head {level!r} lacks state_dict or encoder")
        state = {}
        for key, value in entry["state_dict"].items():
            if key == f"{HEAD_PREFIX}1.num_batches_tracked":
                continue
            if not key.startswith(HEAD_PREFIX) or key[len(HEAD_PREFIX):] not in LAYER_KEYS:
                raise SeedImportError(f"{path}: head {level!r} has unexpected tensor {key!r}")
            state[key[len(HEAD_PREFIX):]] = value.detach().cpu().numpy().astype(np.float32)
        labels = tuple(str(c) for c in entry["encoder"].classes_)
        try:
            head = RankHead(rank, labels, state)
        except RankHeadError as exc:
            raise SeedImportError(f"{path}: {exc}") from exc
        if head.input_dim != input_dim:
            raise SeedImportError(f"{path}: head {level!r} takes {head.input_dim}-d features, "
                                  f"the whitening gives {input_dim}-d")
        if int(entry.get("n_classes", len(labels))) != len(labels):
            raise SeedImportError(f"{path}: head {level!r} n_classes != its label count")
        heads[rank] = (labels, state)
    return heads


def read_seed_v2(prototypes: Path, classifier: Path, taxonomy: Path) -> SeedV2Artifacts:
    protos = read_prototypes(prototypes)
    species = [str(s) for s in protos["species_list"]]
    if len(set(species)) != len(species):
        raise SeedImportError(f"{prototypes}: duplicate names in species_list")
    heads = _heads_from(load_classifier(classifier), classifier, protos["prototypes"].shape[1])
    tax = read_tax_lookup(taxonomy)
    unknown_levels = {lvl for ranks in tax.values() for lvl in ranks} - set(LEVEL_TO_RANK) - {
        "sous_famille"}
    if unknown_levels:
        raise SeedImportError(f"{taxonomy}: unknown rank names {sorted(unknown_levels)}")
    taxonomy_by_rank = {name: {LEVEL_TO_RANK[lvl]: v for lvl, v in ranks.items()
                               if lvl in LEVEL_TO_RANK}
                        for name, ranks in tax.items()}
    return SeedV2Artifacts(
        species=species,
        prototypes=protos["prototypes"].astype(np.float32),
        mean=protos["wh_mean"].astype(np.float32),
        components=protos["wh_components"].astype(np.float32),
        variance=protos["wh_variance"].astype(np.float32),
        temperature=float(protos["temperature"][0]),
        alpha=float(protos["alpha"][0]),
        heads=heads,
        taxonomy=taxonomy_by_rank,
        source={"kind": "biolit-seed-v2",
                **{k: {"file": Path(p).name, "sha256": file_sha256(p)}
                   for k, p in (("prototypes", prototypes), ("classifier", classifier),
                                ("taxonomy", taxonomy))}},
    )


def folded_whitening(mean: np.ndarray, components: np.ndarray, variance: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(mu [1, D], W [D, P]) with ``(x - mu) @ W`` = the seed's centre, project, divide."""
    w = components.astype(np.float64).T / np.sqrt(variance.astype(np.float64) + WHITEN_EPS)
    return mean.reshape(1, -1).astype(np.float32), w.astype(np.float32)


def label_gaps(seed: SeedV2Artifacts) -> dict[str, dict[str, list[str]]]:
    """Per rank: head labels no species carries, and species taxa the head cannot say."""
    gaps = {}
    for rank, (labels, _) in seed.heads.items():
        carried = {t[rank] for t in seed.taxonomy.values() if rank in t}
        extra, missing = sorted(set(labels) - carried), sorted(carried - set(labels))
        if extra or missing:
            gaps[rank] = {"labels_without_species": extra, "taxa_without_label": missing}
    return gaps


def import_seed_v2(prototypes: Path, classifier: Path, taxonomy: Path, model_spec: str,
                   threshold: float = DEFAULT_THRESHOLD, margin: float = DEFAULT_MARGIN,
                   catalog: Catalog | None = None, model=None) -> Bundle:
    """The bundle, not yet saved. ``model`` may be a LoadedModel already in memory."""
    from biolit_id.server.inference.model_loader import load_model

    if not (0.0 <= threshold <= 1.0 and 0.0 <= margin <= 1.0):
        raise SeedImportError(f"--threshold {threshold} and --margin {margin} must be in [0, 1]")
    seed = read_seed_v2(prototypes, classifier, taxonomy)
    catalog = catalog or Catalog.load_default()
    model = model or load_model(model_spec)
    if model.embedding_dim != seed.mean.shape[0]:
        raise SeedImportError(
            f"the seed works on {seed.mean.shape[0]}-d embeddings (BioCLIP-2); {model_spec} "
            f"gives {model.embedding_dim}-d")
    names = names_for(seed.species, catalog)
    species = [names[s] for s in seed.species]
    no_taxonomy = [s for s in seed.species if s not in seed.taxonomy]
    ordered_taxonomy = {names[s]: ranks for s, ranks in seed.taxonomy.items() if s in names}
    settings = SeedV2Settings(threshold=threshold, margin=margin,
                              seed_names={names[s]: s for s in seed.species},
                              taxonomy=ordered_taxonomy)
    mu, w = folded_whitening(seed.mean, seed.components, seed.variance)
    bundle = Bundle(
        model_id=model.spec,
        model_fingerprint=model.fingerprint,
        embedding_dim=model.embedding_dim,
        species=species,
        common=[],
        head_config={},
        head_state={},
        # The seed ships fused prototypes only; its text part equals the visual one (§4).
        visual_prototypes=seed.prototypes,
        text_prototypes=seed.prototypes.copy(),
        prototypes=seed.prototypes.copy(),
        whitening_mu=mu,
        whitening_W=w,
        temperature=seed.temperature,
        alpha=seed.alpha,
        thresholds=Thresholds(classifier_high=threshold, classifier_low=threshold,
                              prototype=threshold),
        routing=ROUTING,
        preprocessing=dict(SEED_PREPROCESSING),
    )
    RankHeads({r: RankHead(r, labels, state) for r, (labels, state) in seed.heads.items()},
              source="seed-v2").attach(bundle)
    bundle.extra.update({
        MANIFEST_KEY: settings.to_manifest(),
        "source": {**seed.source, "unused_alpha": seed.alpha},
        "catalog_missing": [n for n in species if n not in catalog],
        "species_without_taxonomy": no_taxonomy,
        "label_gaps": label_gaps(seed),
    })
    return bundle


def summary_lines(bundle: Bundle) -> list[str]:
    settings = bundle.extra[MANIFEST_KEY]
    heads = bundle.extra["rank_heads"]
    lines = [
        f"  species: {len(bundle.species)} (Proto-CLIP, T = {bundle.temperature:.4f}); "
        f"rank heads: " + ", ".join(f"{r} {len(heads['labels'][r])}" for r in heads["ranks"]),
        f"  model: {bundle.model_id} ({bundle.embedding_dim}-d, fingerprint "
        f"{bundle.model_fingerprint}); whitening {bundle.embedding_dim} -> "
        f"{bundle.prototype_dim}",
        f"  decision: routing {ROUTING}, threshold {settings['threshold']}, "
        f"margin {settings['margin']}",
    ]
    missing = bundle.extra["catalog_missing"]
    lines.append(f"  {len(missing)} species not in the catalog (kept, without taxonomy): "
                 f"{missing}" if missing else "  every species is in the catalog")
    for rank, gap in bundle.extra["label_gaps"].items():
        lines.append(f"  {rank} head vs tax_lookup: {gap}")
    return lines
