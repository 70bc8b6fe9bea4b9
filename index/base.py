"""What every gallery backend shares: errors, outcomes, the live prototypes and their reads.

Kept free of any vector-index library so that a backend (FAISS, Milvus)
loads only what it uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from biolit_id.index.core.catalog_view import CatalogView
from biolit_id.index.core.types import PrototypeSet, SimilarHit
from biolit_id.index.prototypes import PrototypeBuilder, SpeciesSums
from biolit_id.index.store import ExemplarRow

log = logging.getLogger(__name__)


class GalleryConfigError(ValueError):
    """A --gallery value this build cannot serve."""


class GalleryError(RuntimeError):
    """Base of the gallery's client-facing errors."""


class UnknownSpeciesError(GalleryError, KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"species {name!r} is not in the catalog; add it first with AddSpecies "
            f"(biolit-id gallery add-species) or check the spelling with ListSpecies"
        )
        self.name = name

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownExemplarError(GalleryError, KeyError):
    def __init__(self, ids: Sequence[int]) -> None:
        super().__init__(f"no exemplar with id {', '.join(str(i) for i in ids)}")
        self.ids = list(ids)

    def __str__(self) -> str:
        return str(self.args[0])


class SpeciesExistsError(GalleryError):
    pass


class GalleryInUseError(GalleryError):
    """Another process holds the gallery in a way that excludes this one (index/gallery_lock)."""


@dataclass(frozen=True)
class GallerySpace:
    """Where the gallery's vectors live and how a raw embedding gets there."""

    model_fingerprint: str
    embedding_dim: int
    space_id: str
    project: Callable[[np.ndarray], np.ndarray]


_last_degraded_warning = [0.0]


def warn_degraded(exc: Exception, every_s: float = 30.0) -> None:
    """One log line per ``every_s`` while reads run without the backend."""
    now = time.monotonic()
    if now - _last_degraded_warning[0] >= every_s:
        _last_degraded_warning[0] = now
        log.warning("gallery backend unavailable (%s): answering from the prototypes alone, "
                    "without similar photos, until it is back", exc)


@dataclass(frozen=True)
class AddOutcome:
    exemplar_id: int
    created: bool  # False: the same photo was already stored for this species
    species: str


@dataclass(frozen=True)
class RemoveOutcome:
    removed_count: int
    species_updated: list[str]
    version: int


class GalleryBase:
    """What every gallery backend shares: the live PrototypeSet and the read API over it.

    A backend keeps ``_counts`` (photos per species), ``_sums`` (each species'
    running prototype state) and ``_version`` current under ``_write_lock``, and
    implements ``search``, ``_refresh_locked`` (publish from the sums, O(1)) and
    ``_refine_locked`` (recompute the sums from every photo).
    The scorer reads ``prototypes()`` without a lock: writers publish a new
    immutable PrototypeSet (copy-on-write, ``_updated_prototypes``).
    """

    backend = ""

    def __init__(self, *, catalog: CatalogView, builder: PrototypeBuilder,
                 space: GallerySpace) -> None:
        self.catalog = catalog
        self.builder = builder
        self.space = space
        self.project = lambda raw: np.ascontiguousarray(space.project(raw), dtype=np.float32)
        self.space_id = space.space_id
        self.dim = int(builder.base_vectors.shape[1])
        self._write_lock = threading.Lock()
        self._closed = False
        self._counts: dict[str, int] = {}
        self._sums: dict[str, SpeciesSums] = {}
        self._version = 0
        self._refiner: threading.Thread | None = None
        self._refiner_stop = threading.Event()

    @property
    def version(self) -> int:
        return self._version

    @property
    def size(self) -> int:
        return sum(self._counts.values())

    def exemplar_counts(self) -> dict[str, int]:
        return dict(self._counts)

    def prototypes(self) -> PrototypeSet:
        """The current immutable PrototypeSet (Identifier's ``prototypes`` callable)."""
        return self._protos

    def knows(self, name: str) -> bool:
        return name in self.catalog or name in self._row_of

    def similar_search(self, embeddings: np.ndarray, n: int,
                       include_thumbnails: bool = False) -> list[list[SimilarHit]]:
        """Identifier's ``similar_search``: n nearest exemplars per raw embedding row.

        A backend that is away (Milvus stopped) gives no similar photos rather than
        failing the identification: the prototypes are in memory and still answer.
        """
        try:
            return self.search(embeddings, n, include_thumbnails=include_thumbnails)
        except GalleryError as exc:
            warn_degraded(exc)
            return [[] for _ in range(len(np.atleast_2d(embeddings)))]

    def search(self, embeddings: np.ndarray, k: int, species: Sequence[str] | None = None,
               include_thumbnails: bool = False,
               exclude: Sequence[int] = ()) -> list[list[SimilarHit]]:
        raise NotImplementedError

    def refresh(self, species: Sequence[str]) -> None:
        """Recompute these species' prototypes from the stored photos and publish them."""
        if not species:
            return
        with self._write_lock:
            self._refresh_locked(species)

    def _refresh_locked(self, species: Sequence[str]) -> None:
        raise NotImplementedError

    def refine(self, species: Sequence[str] | None = None) -> list[str]:
        """Recompute prototypes from every photo (similarity-weighted), then publish them.

        Adds and removals move prototypes through running sums; this is the
        full, exact computation, costing a read of the species' photos.
        ``species``: default, every species with photos. Returns those refined.
        """
        with self._write_lock:
            names = [n for n in (self._counts if species is None else species)
                     if self.knows(n)]
            if names:
                self._refine_locked(names)
        return names

    def _refine_locked(self, species: Sequence[str]) -> None:
        raise NotImplementedError

    def drifted(self, min_drift: float) -> list[str]:
        """Species whose photos changed by at least ``min_drift`` since their refinement."""
        return [n for n, sums in self._sums.items()
                if sums.count and sums.drift() >= min_drift and self.knows(n)]

    def start_refiner(self, every_s: float, min_drift: float = 0.1) -> None:
        """Refine drifted species in the background every ``every_s`` seconds, one at a
        time (each holds the writer lock for one species' read): with ``min_drift``
        0.1 a species of n photos is re-read after n/10 changes, O(1) per add."""
        if every_s <= 0 or self._refiner is not None:
            return

        def loop() -> None:
            while not self._refiner_stop.wait(every_s):
                for name in self.drifted(min_drift):
                    if self._refiner_stop.is_set():
                        return
                    try:
                        self.refine([name])
                    except GalleryError as exc:  # backend away: the next period retries
                        log.warning("gallery: background refinement of %r failed: %s",
                                    name, exc)
                        break

        self._refiner = threading.Thread(target=loop, name="gallery-refine", daemon=True)
        self._refiner.start()

    def _stop_refiner(self) -> None:
        self._refiner_stop.set()
        if self._refiner is not None:
            self._refiner.join(timeout=30)

    def settle(self) -> None:
        """Finish the indexing a backend does in the background (benchmarks, exports):
        nothing to do where searches always use the full index."""

    def _check_open(self) -> None:
        if self._closed:
            raise GalleryError("the gallery is closed (server shutting down)")

    def _publish(self, protos: PrototypeSet) -> None:
        self._row_of = protos.index()
        self._protos = protos

    def _updated_prototypes(self, updates: Sequence[tuple[str, np.ndarray]]
                            ) -> tuple[PrototypeSet, list[int]]:
        """The current set with these (species, vector) rows replaced or appended, and
        their rows; a species given twice keeps its last vector. Not yet published."""
        protos = self._protos
        names = list(protos.names)
        vectors = protos.vectors.copy()
        row_of = dict(self._row_of)
        appended: list[np.ndarray] = []
        rows: list[int] = []
        for name, vec in updates:
            row = row_of.get(name)
            if row is None:
                row = row_of[name] = len(names)
                names.append(name)
                appended.append(np.asarray(vec, np.float32))
            elif row < len(vectors):
                vectors[row] = vec
            else:
                appended[row - len(vectors)] = np.asarray(vec, np.float32)
            rows.append(row)
        if appended:
            vectors = np.vstack([vectors, *[v[None, :] for v in appended]])
        # Same names object when none was added: SeedCascadeScorer caches its mapping on it.
        new_names = protos.names if len(names) == len(protos.names) else tuple(names)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return PrototypeSet(new_names, vectors, version=self._version), rows


def similar_hit(row: ExemplarRow, score: float) -> SimilarHit:
    return SimilarHit(
        exemplar_id=row.exemplar_id,
        species=row.species,
        score=float(np.clip(score, -1.0, 1.0)),
        thumbnail=row.thumbnail,
        **row.meta_dict(),
    )
