"""The species catalog: names, taxonomy, vernacular names and text prompts.

The catalog is what makes the service useful before any training: every
species in it gets a BioCLIP text prototype, so zero-shot answers work out of
the box. Names are kept exactly as the BioLit seed spells them (``Patella
sp.``, ``Littorina fabalis/obtusata``) because bundles and clients match on
them. It holds both seed generations (``generations``: the first seed's 100
species, the second's 215, in their proper form), and each record says where
every rank came from (``taxonomy_source``; docs/seed-v2.md).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

# Ranks of the lineage, highest first; "species" holds the catalog name itself.
LINEAGE_RANKS: tuple[str, ...] = (
    "kingdom",
    "phylum",
    "class",
    "order",
    "family",
    "genus",
    "species",
)
# Ranks an answer can fall back to when the species is rejected, finest first.
FALLBACK_RANKS: tuple[str, ...] = ("genus", "family", "order", "class")

MAX_NAME_LENGTH = 200


@dataclass(frozen=True)
class GbifMatch:
    """How a name was matched on GBIF; a fuzzy or synonym match is never exact."""

    match_type: str = ""  # EXACT | FUZZY | HIGHERRANK | NONE | "" (never looked up)
    status: str = ""  # ACCEPTED | SYNONYM | DOUBTFUL | ...
    usage_key: int = 0
    accepted_name: str = ""


@dataclass(frozen=True)
class SpeciesRecord:
    scientific_name: str
    rank: str = "species"
    common: bool = False
    taxonomy: dict[str, str] = field(default_factory=dict)
    vernacular: dict[str, list[str]] = field(default_factory=dict)
    description: str = ""
    authorship: str = ""
    added_at_runtime: bool = False
    gbif: GbifMatch = field(default_factory=GbifMatch)
    # Which seed generations know the species: "v4" (100 species), "v2" (215, BioCLIP-2).
    generations: tuple[str, ...] = ()
    # Where each rank of ``taxonomy`` came from (rank -> source), for the shipped catalog.
    taxonomy_source: dict[str, str] = field(default_factory=dict)

    def lineage(self) -> list[tuple[str, str]]:
        """(rank, name) pairs from kingdom to species, skipping unknown ranks."""
        return [(r, self.taxonomy[r]) for r in LINEAGE_RANKS if self.taxonomy.get(r)]

    def taxon_at(self, rank: str) -> str:
        return self.taxonomy.get(rank, "")

    def prompt(self) -> str:
        """BioCLIP's training caption form: taxonomic string plus common name.

        BioCLIP's authors report "a photo of <kingdom ... genus species> with
        common name <name>." as its best zero-shot text; species groups and
        "sp." names keep their genus as the last taxonomic word.
        """
        genus = self.taxonomy.get("genus", "")
        words = [self.taxonomy.get(r, "") for r in LINEAGE_RANKS[:-2]]
        name = self.scientific_name
        if genus and (name == genus or name.startswith(genus + " ")):
            words.append(genus)  # a group across genera ("Magallana / Ostrea") is no word
        words.append(_epithet(name, genus))
        taxonomic = " ".join(w for w in words if w)
        english = self.vernacular.get("en") or []
        if english:
            return f"a photo of {taxonomic} with common name {english[0]}."
        return f"a photo of {taxonomic}."

    def to_json(self) -> dict:
        return {
            "scientific_name": self.scientific_name,
            "rank": self.rank,
            "common": self.common,
            "taxonomy": dict(self.taxonomy),
            "authorship": self.authorship,
            "vernacular": {k: list(v) for k, v in self.vernacular.items()},
            "description": self.description,
            "added_at_runtime": self.added_at_runtime,
            "gbif": self.gbif.__dict__ if self.gbif.match_type else {},
            "generations": list(self.generations),
            "taxonomy_source": dict(self.taxonomy_source),
        }

    @classmethod
    def from_json(cls, data: dict) -> SpeciesRecord:
        name = data["scientific_name"]
        taxonomy = {r: str(v) for r, v in (data.get("taxonomy") or {}).items() if v}
        taxonomy.setdefault("species", name)
        return cls(
            scientific_name=name,
            rank=data.get("rank", "species"),
            common=bool(data.get("common", False)),
            taxonomy=taxonomy,
            vernacular={k: list(v) for k, v in (data.get("vernacular") or {}).items()},
            description=data.get("description", ""),
            authorship=data.get("authorship", ""),
            added_at_runtime=bool(data.get("added_at_runtime", False)),
            gbif=GbifMatch(**(data.get("gbif") or {})),
            generations=tuple(data.get("generations") or ()),
            taxonomy_source={r: str(v) for r, v in (data.get("taxonomy_source") or {}).items()},
        )


def _epithet(name: str, genus: str) -> str:
    """What follows the genus in the caption: "maenas", "" for "Patella sp."."""
    if genus and name.startswith(genus + " "):
        rest = name[len(genus) + 1 :]
        return "" if rest in {"sp.", "spp."} else rest
    return "" if name == genus else name


class UnknownTaxonError(KeyError):
    """A name that is neither a catalog species nor a taxon above one."""


class Catalog:
    """An ordered, thread-safe list of species with lookups by name and taxon.

    The order is stable: it indexes prototype rows and the zero-shot softmax.
    Runtime additions (``AddSpecies``) append at the end.
    """

    def __init__(self, records: Iterable[SpeciesRecord], version: str) -> None:
        self.version = version
        self._lock = threading.Lock()
        self._records: list[SpeciesRecord] = []
        self._index: dict[str, int] = {}
        for record in records:
            self._append(record)

    @classmethod
    def load_default(cls) -> Catalog:
        data = resources.files("biolit_id.server").joinpath("data/species_catalog.json")
        text = data.read_text("utf-8")
        return cls.from_json(json.loads(text))

    @classmethod
    def load(cls, path: Path) -> Catalog:
        return cls.from_json(json.loads(Path(path).read_text("utf-8")))

    @classmethod
    def from_json(cls, data: dict) -> Catalog:
        records = [SpeciesRecord.from_json(s) for s in data["species"]]
        return cls(records, version=data.get("catalog_version", "unversioned"))

    def to_json(self) -> dict:
        return {"catalog_version": self.version, "species": [r.to_json() for r in self]}

    def _append(self, record: SpeciesRecord) -> int:
        if record.scientific_name in self._index:
            raise ValueError(f"duplicate species {record.scientific_name!r}")
        self._records.append(record)
        self._index[record.scientific_name] = len(self._records) - 1
        return len(self._records) - 1

    def add(self, record: SpeciesRecord) -> int:
        """Append a runtime species; returns its index."""
        with self._lock:
            return self._append(record)

    def update(self, record: SpeciesRecord) -> None:
        """Replace a species' metadata (e.g. after GBIF enrichment), keeping its index."""
        with self._lock:
            self._records[self._index[record.scientific_name]] = record

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[SpeciesRecord]:
        return iter(list(self._records))

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        return [r.scientific_name for r in self._records]

    def of_generation(self, generation: str) -> Catalog:
        """The species one seed generation knows ("v4": the first catalog's 100), in order."""
        return Catalog([r for r in self if generation in r.generations], self.version)

    def get(self, name: str) -> SpeciesRecord | None:
        i = self._index.get(name)
        return None if i is None else self._records[i]

    def record_from_json(self, data: dict) -> SpeciesRecord:
        """A species as the gallery persisted it (``biolit_id.index.core.catalog_view``)."""
        return SpeciesRecord.from_json(data)

    def prompt_for(self, name: str) -> str:
        """The caption of ``name``'s text prototype."""
        record = self.get(name)
        if record is None:
            raise UnknownTaxonError(name)
        return record.prompt()

    def first_under(self, rank: str, taxon: str) -> SpeciesRecord | None:
        """A species under ``taxon`` at ``rank``: its lineage down to that rank describes it."""
        return next((r for r in self._records if r.taxonomy.get(rank) == taxon), None)

    def species_under(self, taxon: str) -> list[str]:
        """Catalog species that are ``taxon`` or lie under it, at any rank."""
        if taxon in self._index:
            return [taxon]
        found = [r.scientific_name for r in self._records if taxon in r.taxonomy.values()]
        if not found:
            raise UnknownTaxonError(taxon)
        return found
