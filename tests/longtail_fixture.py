"""The first synthetic long tail, kept as a test fixture (no longer a product command).

Isotropic equal-covariance noise around views in random directions, clean
validation and test labels, the training prior at test: the model under which a
cosine softmax with one temperature is optimal, so it flatters the method.
``biolit-id bench-quality`` uses the realistic generators instead
(``tools/evaluation/realistic_v4.py``, ``../shared/benchmarks/longtail_realistic.py``);
tests use this one because it is small, fast and deterministic.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from biolit_id.cli.evaluation.realistic_v4 import DEFAULT_SEED_DIR, seed_structure
from biolit_id.cli.training.datasets import EmbeddingSet, stratified_split, write_embeddings
from biolit_id.server.catalog.catalog import Catalog

FRACTIONS = (0.70, 0.15, 0.15)
RAW_NORM = 0.85  # |f - mu| of a unit embedding whose mean has norm ~0.53 (the seed's mu)


@dataclass(frozen=True)
class LongTailSpec:
    """Knobs of the generator; the defaults are the benchmark docs/quality.md reports."""

    seed: int = 0
    label_noise: float = 0.03  # share of training labels that are wrong
    common_range: tuple[int, int] = (60, 400)
    rare_range: tuple[int, int] = (12, 60)
    views: tuple[int, int] = (1, 4)  # views per species, inclusive
    view_spread: float = 1.0  # norm of a view's offset from the prototype (whitened, unit proto)
    noise: float = 3.0  # norm of a photo's offset from its view centre (whitened)
    residual: float = 0.02  # isotropic 512-d noise outside the seed's 256 PCA directions
    confusable: int = 5  # a "confusable" wrong label is among this many nearest species


@dataclass
class LongTail:
    train: EmbeddingSet
    val: EmbeddingSet
    test: EmbeddingSet
    species: list[str]
    common: list[str]
    spec: LongTailSpec
    flipped: int  # training labels made wrong

    def parts(self) -> dict[str, EmbeddingSet]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def generate(spec: LongTailSpec = LongTailSpec(), catalog: Catalog | None = None,
             seed_dir: Path = DEFAULT_SEED_DIR) -> LongTail:
    """The three splits, deterministic in ``spec`` (same spec, same vectors)."""
    catalog = catalog or Catalog.load_default()
    names, protos, mu, w = seed_structure(seed_dir)
    rng = np.random.default_rng(spec.seed)
    back = np.linalg.pinv(w)  # [256, 512]: whitened -> raw offset
    dim_w, dim = protos.shape[1], mu.shape[1]
    # kappa maps a typical whitened photo (norm ~ sqrt(1 + noise^2)) to |f - mu| ~ RAW_NORM.
    typical = np.linalg.norm(_unit(rng.normal(size=(256, dim_w))) @ back, axis=1).mean()
    kappa = RAW_NORM / (typical * np.sqrt(1.0 + spec.noise ** 2))
    common = [n for n in names if (catalog.get(n) is not None and catalog.get(n).common)]
    species, rows = [], []
    for i, name in enumerate(names):
        lo, hi = spec.common_range if name in common else spec.rare_range
        n = int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1))))
        n = min(max(n, lo), hi)
        k = int(rng.integers(spec.views[0], spec.views[1] + 1))
        offsets = _unit(rng.normal(size=(k, dim_w))) * spec.view_spread
        views = _unit(protos[i] + offsets)
        share = rng.dirichlet(np.full(k, 2.0))  # views are not equally frequent
        which = rng.choice(k, size=n, p=share)
        noise = rng.normal(size=(n, dim_w)) * (spec.noise / np.sqrt(dim_w))
        whitened = views[which] + noise
        residual = rng.normal(size=(n, dim)) * (spec.residual / np.sqrt(dim))
        raw = mu + kappa * whitened @ back + residual
        rows.append(_unit(raw))
        species += [name] * n
    emb = np.concatenate(rows).astype(np.float32)
    images = [f"longtail/s{spec.seed}/{i:05d}" for i in range(len(species))]
    full = EmbeddingSet(species, emb, images, meta={"synthetic": "longtail", **_meta(spec)})
    train_rows, val_rows, test_rows = stratified_split(full.species, FRACTIONS, spec.seed)
    train = full.subset(train_rows)
    flipped = _add_label_noise(train, names, protos, spec, rng)
    return LongTail(train, full.subset(val_rows), full.subset(test_rows), names, common, spec,
                    flipped)


def _add_label_noise(train: EmbeddingSet, names: list[str], protos: np.ndarray,
                     spec: LongTailSpec, rng: np.random.Generator) -> int:
    """Relabel a share of the photos in place: half to a look-alike, half to anything."""
    if spec.label_noise <= 0 or not len(train):
        return 0
    index = {n: i for i, n in enumerate(names)}
    sims = protos @ protos.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1)[:, : spec.confusable]
    chosen = np.flatnonzero(rng.random(len(train)) < spec.label_noise)
    for row in chosen:
        true = index[train.species[row]]
        if rng.random() < 0.5:
            wrong = int(nearest[true][rng.integers(spec.confusable)])
        else:
            wrong = int(rng.integers(len(names) - 1))
            wrong += wrong >= true
        train.species[row] = names[wrong]
    return len(chosen)


def _meta(spec: LongTailSpec) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}


def write(out: Path, data: LongTail) -> dict:
    """``train/val/test.parquet`` and ``longtail.json`` (spec, counts) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in data.parts().items():
        write_embeddings(out / f"{name}.parquet", part)
    info = {
        "synthetic": True,
        "what": "synthetic embeddings from the seed's real prototypes; not real photos",
        "spec": _meta(data.spec),
        "species": len(data.species), "common": data.common,
        "counts": {k: len(v) for k, v in data.parts().items()},
        "train_labels_flipped": data.flipped,
    }
    (out / "longtail.json").write_text(json.dumps(info, indent=2, ensure_ascii=False), "utf-8")
    return info
