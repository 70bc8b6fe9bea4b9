"""``biolit-id evaluate --real-crops FEATURES.npz``: a bundle on the seed v2's 79 real crops.

The only real, labelled BioCLIP-2 embeddings this project has: 79 crops of 46
field photos (the seed v2 data, docs/seed-v2.md). Their labels are the observers' French
vernacular names inside the file names (``{id}_{vernacular}_{photo}_{phrase}_
{score}.jpg``), mapped to species through the catalog's French names only when
exactly one species carries the name. Observations of a species' eggs,
cuttlebone or fruit (``Ponte de nasse réticulée``, ``Os de seiche``, ``Olive de
Posidonie``) are mapped through the species they name. Everything else stays
unmapped and is counted.

What this is: a tiny sample, some of it probably in the seed's own training
set, of crops from an open-vocabulary detector. It says whether a bundle is
roughly sane on real photos, not how accurate it is.

The crops go through the service's own ``Identifier`` (the bundle's scorer,
its rank answers, the catalog), as embeddings, so no model is loaded.
"""

from __future__ import annotations

import argparse
import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biolit_id.cli.seedcompat.formats import read_feature_cache
from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import BundleError, load_bundle
from biolit_id.server.decision.rank_heads_scorer import with_rank_heads
from biolit_id.server.decision.registry import scorer_for
from biolit_id.server.inference.pipeline import Identifier

CROP_NAME = re.compile(r"^(?P<obs>\d+)_(?P<name>.+?)_(?P<photo>\d+)_(?P<phrase>.+)_"
                       r"(?P<score>[0-9.]+)\.(?:jpe?g|png|webp)$", re.IGNORECASE)
# An observation of part of an organism names the organism after one of these.
REMAINS = ("ponte de ", "ponte d'", "os de ", "olive de ")
CAVEAT = ("real crops labelled from observers' vernacular names, some probably in the seed's "
          "training set: a sanity check on real photos, not a benchmark")


def normalise(name: str) -> str:
    """Case, accents, underscores, hyphens and apostrophes folded away."""
    text = unicodedata.normalize("NFKD", name.replace("_", " ").replace("’", "'"))
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return " ".join(text.replace("-", " ").split())


@dataclass
class LabelMap:
    """French vernacular name -> species, unambiguous names only."""

    names: dict[str, str]
    ambiguous: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_catalog(cls, catalog: Catalog, language: str = "fr") -> LabelMap:
        owners: dict[str, set[str]] = defaultdict(set)
        for record in catalog:
            for name in record.vernacular.get(language, []):
                owners[normalise(name)].add(record.scientific_name)
        return cls({n: next(iter(s)) for n, s in owners.items() if len(s) == 1},
                   {n: sorted(s) for n, s in owners.items() if len(s) > 1})

    def species_for(self, vernacular: str) -> tuple[str, str]:
        """(species or "", how): "name", "remains", "ambiguous" or "unknown"."""
        key = normalise(vernacular)
        if key in self.names:
            return self.names[key], "name"
        for prefix in REMAINS:
            if key.startswith(prefix) and key[len(prefix):] in self.names:
                return self.names[key[len(prefix):]], "remains"
        return "", "ambiguous" if key in self.ambiguous else "unknown"


@dataclass(frozen=True)
class Crop:
    image: str
    photo: str  # observation id and photo number: crops of one photo share it
    vernacular: str
    species: str  # "" when unmapped
    how: str


def crops_of(images: list[str], labels: LabelMap) -> list[Crop]:
    out = []
    for image in images:
        m = CROP_NAME.match(image)
        vernacular = m["name"].replace("_", " ") if m else ""
        species, how = labels.species_for(vernacular) if m else ("", "unparsed")
        photo = f"{m['obs']}_{m['photo']}" if m else image
        out.append(Crop(image, photo, vernacular, species, how))
    return out


class EmbeddingsOnly:
    """The Identifier's embedder slot when every input is an embedding: no model loaded."""

    runtime, precision = "none", "none"

    def __init__(self, dim: int) -> None:
        self.embedding_dim = dim

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        raise RuntimeError("evaluate --real-crops takes embeddings only")


def _truth_taxon(species: str, rank: str, bundle_taxonomy: dict, catalog: Catalog) -> str:
    """The true species' taxon at ``rank``, in the vocabulary the bundle answers in."""
    if species in bundle_taxonomy and rank in bundle_taxonomy[species]:
        return bundle_taxonomy[species][rank]
    record = catalog.get(species)
    return record.taxon_at(rank) if record else ""


def evaluate_real_crops(bundle_dir: Path, features: Path, catalog: Catalog | None = None
                        ) -> dict:
    catalog = catalog or Catalog.load_default()
    bundle = load_bundle(bundle_dir)
    images, vectors = read_feature_cache(features)
    if vectors.shape[1] != bundle.embedding_dim:
        raise BundleError(f"{features} holds {vectors.shape[1]}-d embeddings; the bundle was "
                          f"made for {bundle.embedding_dim}-d ones (another model)")
    labels = LabelMap.from_catalog(catalog)
    crops = crops_of(images, labels)
    scorer = with_rank_heads(scorer_for(bundle))
    protos = PrototypeSet(tuple(bundle.species), bundle.prototypes.astype(np.float32), 0)
    identifier = Identifier(catalog, EmbeddingsOnly(bundle.embedding_dim), scorer,
                            lambda: protos, policy=None)
    rows = np.stack([identifier.check_embedding(v) for v in vectors])
    options = identifier.options(5, 0, [])
    results = identifier.identify_embeddings(rows, [options] * len(rows))
    seed_taxonomy = (bundle.extra.get("seed_v2") or {}).get("taxonomy", {})

    per_rank: dict[str, Counter] = defaultdict(Counter)
    top1 = top5 = 0
    unmapped = Counter()
    mapped = [c for c in crops if c.species]
    for crop, result in zip(crops, results, strict=True):
        if not crop.species:
            unmapped[crop.vernacular] += 1
            continue
        candidates = [n for n, _ in result.prototype_candidates]
        top1 += bool(candidates) and candidates[0] == crop.species
        top5 += crop.species in candidates[:5]
        rank = result.rank or "rejected"
        per_rank[rank]["answers"] += 1
        if result.rank == "species" or result.rank in {"species_group", "subspecies"}:
            per_rank[rank]["right"] += result.species == crop.species
        elif result.rank:
            truth = _truth_taxon(crop.species, result.rank, seed_taxonomy, catalog)
            per_rank[rank]["right"] += bool(truth) and truth == result.taxon
    n = len(mapped)
    answered = sum(c["answers"] for r, c in per_rank.items() if r != "rejected")
    right = sum(c["right"] for r, c in per_rank.items() if r != "rejected")
    return {
        "caveat": CAVEAT,
        "bundle_id": bundle.bundle_id,
        "routing": bundle.routing,
        "crops": len(crops),
        "photos": len({c.photo for c in crops}),
        "mapped": n,
        "mapped_by": dict(Counter(c.how for c in mapped)),
        "unmapped": dict(unmapped),
        "unmapped_reasons": dict(Counter(c.how for c in crops if not c.species)),
        "species_in_bundle": sum(c.species in protos.index() for c in mapped),
        "prototype_top1": _share(top1, n),
        "prototype_top5": _share(top5, n),
        "answered": _share(answered, n),
        "answers_right": _share(right, answered),
        "per_rank": {r: {"answers": c["answers"], "right": c["right"] if r != "rejected"
                         else None} for r, c in sorted(per_rank.items())},
    }


def _share(num: int, den: int) -> dict:
    return {"count": int(num), "of": int(den), "rate": (num / den) if den else None}


def lines(report: dict) -> list[str]:
    out = [f"real crops ({report['caveat']}):",
           f"  {report['crops']} crops of {report['photos']} photos; labels mapped for "
           f"{report['mapped']} ({report['mapped_by']}), unmapped "
           f"{report['crops'] - report['mapped']} {report['unmapped_reasons']}"]
    for key in ("prototype_top1", "prototype_top5", "answered", "answers_right"):
        s = report[key]
        rate = "n/a" if s["rate"] is None else f"{s['rate']:.3f}"
        out.append(f"  {key:16s} {s['count']}/{s['of']} = {rate}")
    for rank, c in report["per_rank"].items():
        out.append(f"  {rank:16s} {c['answers']} answers"
                   + ("" if c["right"] is None else f", {c['right']} right"))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real-crops", type=Path, default=None, metavar="NPZ",
                        help="instead of the test split: the seed v2's feature cache of real "
                             "crops (bioclip_features.npz), labelled from their file names")


def run(args: argparse.Namespace) -> int:
    catalog = Catalog.load(args.catalog) if args.catalog else Catalog.load_default()
    try:
        report = evaluate_real_crops(args.bundle, args.real_crops, catalog)
    except (BundleError, ValueError, OSError) as exc:
        print(f"evaluate: {exc}")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_crops.json").write_text(json.dumps(report, indent=2, ensure_ascii=False),
                                         "utf-8")
    for line in lines(report):
        print(line)
    print(f"-> {out / 'real_crops.json'}")
    return 0
