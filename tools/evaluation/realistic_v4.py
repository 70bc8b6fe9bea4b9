"""A realistic long-tail benchmark on the first-generation seed (v4): 100 species, 512-d.

The mechanisms of ``../shared/benchmarks/longtail_realistic.py`` (built on the
second generation, 215 species, 768-d) applied to the seed's own 100 visual
prototypes and whitening (``../shared/seed-v4/prototypes_v4.pt``): heteroscedastic
species, multimodal views leaning toward the nearest look-alike, anisotropic
heavy-tailed noise, label noise in every split, a flatter test prior and
species outside the catalog in the test set only. Synthetic embeddings, not
photos: it says how a decision behaves under these mechanisms, not how it does
on BioLit's photos.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from biolit_id.cli.training.datasets import embedding_column, write_table
from biolit_id.server.catalog.catalog import LINEAGE_RANKS, Catalog

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"
DEFAULT_SEED_DIR = SHARED / "seed-v4"
SEED_PROTOTYPES_FILE = "prototypes_v4.pt"
SPLITS = ("train", "val", "test")
LABEL_NOISE = {"train": 0.03, "val": 0.02, "test": 0.02}
# longtail_realistic.py's shape for 215 species: 60 frequent ones, 15 outside the catalog.
FREQUENT_SHARE = 60 / 215
OUTSIDE_SHARE = 15 / 215


@dataclass(frozen=True)
class RealisticSpec:
    """The generator's knobs; ``scale`` < 1 shrinks every species' photo count (tests)."""

    seed: int = 0
    difficulty: float = 1.0
    scale: float = 1.0
    min_photos: int = 8


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def seed_structure(seed_dir: Path = DEFAULT_SEED_DIR
                   ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(names, unit whitened prototypes [100, 256], mu [1, 512], W [512, 256]) of the seed."""
    from biolit_id.cli.seedcompat.import_v4 import load_seed_file

    raw = load_seed_file(Path(seed_dir) / SEED_PROTOTYPES_FILE)
    names = [str(raw["idx_to_species"][i]) for i in range(int(raw["num_species"]))]
    protos = raw["prototypes"]
    protos = np.asarray(protos.numpy() if hasattr(protos, "numpy") else protos, np.float64)
    mu = np.asarray(raw["whitening_mu"], dtype=np.float64).reshape(1, -1)
    w = np.asarray(raw["whitening_W"], dtype=np.float64)
    return names, _unit(protos), mu, w


def _photos(rng: np.random.Generator, protos: np.ndarray, c: int, lookalike: int,
            n: int, spread: float) -> np.ndarray:
    """Whitened photos of species ``c``: views leaning to its look-alike, stretched
    Student-t noise (longtail_realistic.py's constants)."""
    d = protos.shape[1]
    n_views = int(rng.integers(1, 5))
    lean = rng.uniform(0.0, 0.5, n_views)[:, None]
    toward = _unit(protos[lookalike] - protos[c])
    directions = (1 - lean) * _unit(rng.standard_normal((n_views, d))) + lean * toward
    views = _unit(protos[c] + rng.uniform(0.6, 1.1) * _unit(directions))
    stretch = _unit(rng.standard_normal((8, d)))  # the species' own directions of variation
    k = rng.integers(0, n_views, n)
    noise = rng.standard_normal((n, d)) + 2.0 * rng.standard_normal((n, 8)) @ stretch
    radius = np.sqrt(5 / rng.chisquare(5, n))[:, None]  # a few very off photos
    return 6 * views[k] + spread * 0.56 * radius * noise


def generate(out: Path, spec: RealisticSpec = RealisticSpec(),
             catalog: Catalog | None = None, seed_dir: Path = DEFAULT_SEED_DIR) -> dict:
    """Write ``out/{train,val,test}.parquet`` (species, embedding, in_catalog) and
    ``out/taxonomy.json`` (from the catalog); returns the counts."""
    catalog = catalog or Catalog.load_default()
    names, protos, mu, w = seed_structure(seed_dir)
    back = np.linalg.pinv(w)  # whitened 256 -> raw 512 (W is a PCA whitening)
    drop = np.linalg.svd(w, full_matrices=True)[0][:, w.shape[1]:]  # raw directions it drops
    rng = np.random.default_rng(spec.seed)
    n_species = len(names)
    sims = protos @ protos.T
    np.fill_diagonal(sims, -1)
    lookalike = sims.argmax(1)

    rank = np.empty(n_species, int)
    rank[rng.permutation(n_species)] = np.arange(n_species)
    count = np.maximum(spec.min_photos,
                       (spec.scale * 900 / (1 + rank) ** 0.85).astype(int))
    rare = rank >= round(FREQUENT_SHARE * n_species)
    n_outside = max(1, round(OUTSIDE_SHARE * n_species))
    outside = set(rng.choice(np.flatnonzero(rare), n_outside, replace=False).tolist())

    rows: dict[str, list[tuple[int, np.ndarray, bool]]] = {s: [] for s in SPLITS}
    for c in range(n_species):
        spread = spec.difficulty * rng.uniform(1.0, 1.45) * (1.15 if rare[c] else 1.0)
        n = int(count[c])
        white = _photos(rng, protos, c, int(lookalike[c]), n, spread)
        raw = mu + white @ back + 0.02 * rng.standard_normal((n, drop.shape[1])) @ drop.T
        x = _unit(raw).astype(np.float32)
        if c in outside:
            rows["test"] += [(c, v, False) for v in x[: max(3, n // 4)]]
            continue
        idx = rng.permutation(n)
        a, b = round(0.6 * n), round(0.8 * n)
        test_keep = idx[b:]
        if not rare[c]:  # prior shift: a flatter test set
            test_keep = test_keep[: max(6, int(len(test_keep) ** 0.8))]
        for split, sel in (("train", idx[:a]), ("val", idx[a:b]), ("test", test_keep)):
            rows[split] += [(c, x[i], True) for i in sel]

    inside = np.array([c for c in range(n_species) if c not in outside])
    for split in SPLITS:  # volunteers' labels: half of the wrong ones name a look-alike
        part = rows[split]
        for i in np.flatnonzero(rng.random(len(part)) < LABEL_NOISE[split]):
            c, v, known = part[i]
            if not known:
                continue
            j = (int(lookalike[c]) if rng.random() < 0.5 and lookalike[c] not in outside
                 else int(rng.choice(inside)))
            part[i] = (j, v, known)

    out = Path(out)
    meta = {"synthetic": "realistic_v4", **asdict(spec)}
    import pyarrow as pa

    for split, part in rows.items():
        write_table(out / f"{split}.parquet", {
            "species": pa.array([names[c] for c, _, _ in part], type=pa.string()),
            "embedding": embedding_column(np.stack([v for _, v, _ in part])),
            "in_catalog": pa.array([k for _, _, k in part], type=pa.bool_()),
        }, meta)
    taxonomy = {}
    for name in names:
        record = catalog.get(name)
        taxonomy[name] = ({r: t for r, t in record.taxonomy.items() if r in LINEAGE_RANKS}
                          if record else {"genus": name.split()[0]})
    (out / "taxonomy.json").write_text(json.dumps(taxonomy, indent=1, ensure_ascii=False),
                                       "utf-8")
    return {**{s: len(p) for s, p in rows.items()}, "outside_catalog_species": len(outside)}
