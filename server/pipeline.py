"""The inference pipeline: decode -> embed -> score -> route -> explain.

Transport-free on purpose: the gRPC servicer, ``infer-csv`` and the
evaluation tools call the same ``Identifier`` so that an answer does not
depend on how it was asked for.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from biolit_id.core.types import PrototypeSet, SimilarHit
from biolit_id.core.vectors import l2_normalize
from biolit_id.server.catalog import Catalog, SpeciesRecord, UnknownTaxonError
from biolit_id.server.embedders.base import Embedder
from biolit_id.server.preprocess import ImagePolicy, preprocess
from biolit_id.server.routing import Method
from biolit_id.server.scoring import NeighbourFn, Scorer, Scores
from biolit_id.server.taxonomy import (
    RankAnswer,
    answer_rank,
    rank_confidences,
    taxon_fallback,
)

DEFAULT_TOP_K = 5
MAX_TOP_K = 1000
MAX_NUM_SIMILAR = 100
MAX_RESTRICT_TO = 500


class InvalidRequestError(ValueError):
    """Client error: maps to INVALID_ARGUMENT with this message."""


@dataclass(frozen=True)
class IdentifyOptions:
    top_k: int = DEFAULT_TOP_K
    num_similar: int = 0
    restrict_to: tuple[str, ...] = ()
    include_thumbnails: bool = False


@dataclass
class Identification:
    method: Method
    species: str  # "" when rejected or answered above species level
    confidence: float
    rank: str  # "species", "genus", ... or "" when rejected
    taxon: str
    classifier_candidates: list[tuple[str, float]]
    prototype_candidates: list[tuple[str, float]]
    record: SpeciesRecord | None  # taxonomy source for the answer
    rank_confidences: list[RankAnswer] = field(default_factory=list)
    similar: list[SimilarHit] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    # The decision's species distribution over ``names`` (observations combine these).
    distribution: np.ndarray | None = None
    names: tuple[str, ...] = ()


SimilarSearch = Callable[[np.ndarray, int, bool], list[list[SimilarHit]]]


class Identifier:
    def __init__(
        self,
        catalog: Catalog,
        embedder: Embedder,
        scorer: Scorer,
        prototypes: Callable[[], PrototypeSet],
        policy: ImagePolicy,
        similar_search: SimilarSearch | None = None,
        embed_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        neighbours: NeighbourFn | None = None,
        decode_slots: int = 0,
    ) -> None:
        self.catalog = catalog
        self.embedder = embedder
        self.scorer = scorer
        self.prototypes = prototypes
        self.policy = policy
        self.similar_search = similar_search
        # The micro-batcher, when there is one, replaces direct embedder calls.
        self.embed_fn = embed_fn or embedder.embed
        # Nearest reference photos per species, for scorers that use them (routing fused).
        self.neighbours = neighbours
        # At most this many photos decode at once (0: one per calling thread), so that
        # decoders leave the model's threads their cores (docs/performance.md).
        self._decode_slots = (threading.BoundedSemaphore(decode_slots) if decode_slots > 0
                              else contextlib.nullcontext())

    @property
    def embedding_dim(self) -> int:
        return self.embedder.embedding_dim

    # ----------------------------------------------------------- validation

    def options(self, top_k: int, num_similar: int, restrict_to: Sequence[str],
                include_thumbnails: bool = False) -> IdentifyOptions:
        if top_k < 0 or top_k > MAX_TOP_K:
            raise InvalidRequestError(
                f"top_k must be in [0, {MAX_TOP_K}] (0 = default), got {top_k}"
            )
        if num_similar < 0 or num_similar > MAX_NUM_SIMILAR:
            raise InvalidRequestError(
                f"num_similar must be in [0, {MAX_NUM_SIMILAR}], got {num_similar}"
            )
        if len(restrict_to) > MAX_RESTRICT_TO:
            raise InvalidRequestError(
                f"restrict_to has {len(restrict_to)} names, at most {MAX_RESTRICT_TO} allowed"
            )
        return IdentifyOptions(
            top_k=top_k or DEFAULT_TOP_K,
            num_similar=num_similar,
            restrict_to=tuple(restrict_to),
            include_thumbnails=include_thumbnails,
        )

    def check_embedding(self, values: Sequence[float]) -> np.ndarray:
        """A client's embedding as a unit row, or a clear error."""
        vec = np.asarray(values, dtype=np.float32)
        if vec.shape != (self.embedding_dim,):
            raise InvalidRequestError(
                f"embedding has {vec.size} values; the model's embedding_dim is "
                f"{self.embedding_dim}"
            )
        if not np.all(np.isfinite(vec)):
            raise InvalidRequestError("embedding contains NaN or infinity")
        if not np.any(vec):
            raise InvalidRequestError("embedding is all zeros")
        # Scale by the largest magnitude first: squares of ~1e38 overflow and of
        # denormals underflow in float32, which would give a non-unit row.
        vec = vec / np.max(np.abs(vec))
        return l2_normalize(vec[None, :])[0]

    def allowed_mask(self, protos: PrototypeSet, restrict_to: Sequence[str]) -> np.ndarray | None:
        if not restrict_to:
            return None
        index = protos.index()
        mask = np.zeros(len(protos.names), dtype=bool)
        for name in restrict_to:
            try:
                members = self.catalog.species_under(name)
            except UnknownTaxonError:
                raise InvalidRequestError(
                    f"restrict_to: unknown species or taxon {name!r}"
                ) from None
            for member in members:
                if member in index:
                    mask[index[member]] = True
        if not mask.any():
            raise InvalidRequestError(
                f"restrict_to {list(restrict_to)} leaves no species this service can answer"
            )
        return mask

    # ------------------------------------------------------------- pipeline

    def decode(self, image: bytes) -> np.ndarray:
        with self._decode_slots:
            return preprocess(image, self.policy)

    def embed_images(self, images: Sequence[bytes]) -> tuple[np.ndarray, float, float]:
        """Embeddings for a list of photos, plus decode and embed ms per photo."""
        t0 = time.perf_counter()
        pixels = np.stack([self.decode(img) for img in images])
        t1 = time.perf_counter()
        emb = self.embed_fn(pixels)
        t2 = time.perf_counter()
        n = max(1, len(images))
        return emb, (t1 - t0) * 1e3 / n, (t2 - t1) * 1e3 / n

    def identify_embeddings(
        self, embeddings: np.ndarray, options: Sequence[IdentifyOptions]
    ) -> list[Identification]:
        """Score a batch; each row may carry its own options (restriction, top_k)."""
        protos = self.prototypes()
        results = []
        for row, opts in zip(embeddings, options, strict=True):
            t0 = time.perf_counter()
            allowed = self.allowed_mask(protos, opts.restrict_to)
            scores = self.scorer.score(row[None, :], protos, allowed, self.neighbours)
            result = self._explain(scores, protos, opts)
            own = getattr(self.scorer, "explain", None)  # a rule with its own rank answers
            if own is not None:
                result = own(result, scores, protos, self.catalog, row[None, :])
            result.distribution, result.names = scores.distribution[0], protos.names
            t1 = time.perf_counter()
            if opts.num_similar and self.similar_search is not None:
                result.similar = self.similar_search(
                    row[None, :], opts.num_similar, opts.include_thumbnails
                )[0]
            t2 = time.perf_counter()
            result.timing = {"score_ms": (t1 - t0) * 1e3, "search_ms": (t2 - t1) * 1e3}
            results.append(result)
        return results

    def identify_images(
        self, images: Sequence[bytes], options: Sequence[IdentifyOptions]
    ) -> list[Identification]:
        emb, decode_ms, embed_ms = self.embed_images(images)
        results = self.identify_embeddings(emb, options)
        for r in results:
            r.timing.update(decode_ms=decode_ms, embed_ms=embed_ms)
        return results

    def _explain(
        self, scores: Scores, protos: PrototypeSet, opts: IdentifyOptions
    ) -> Identification:
        routed = scores.routed
        method = Method(int(routed.method[0]))
        idx = int(routed.species[0])
        k = min(opts.top_k, len(protos.names))
        common_names = [protos.names[g] for g in scores.common_to_global]
        result = Identification(
            method=method,
            species=protos.names[idx] if idx >= 0 else "",
            confidence=float(np.clip(routed.confidence[0], 0.0, 1.0)),
            rank="",
            taxon="",
            classifier_candidates=_top(scores.p_common[0], common_names, k),
            prototype_candidates=_top(scores.p_proto[0], protos.names, k),
            record=None,
        )
        result.rank_confidences = rank_confidences(scores, protos.names, self.catalog)
        if idx >= 0:
            result.record = self.catalog.get(result.species)
            result.rank = answer_rank(result.record)
            result.taxon = result.species
            return result
        fallback = taxon_fallback(result.rank_confidences, self.scorer.bundle)
        if fallback is not None:
            result.method = Method.TAXON
            result.rank, result.taxon = fallback.rank, fallback.taxon
            result.confidence = fallback.confidence
            result.record = _record_for_taxon(self.catalog, fallback.rank, fallback.taxon)
        return result


def _top(probs: np.ndarray, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    if probs.size == 0:
        return []
    k = min(k, probs.size)
    idx = np.argsort(-probs, kind="stable")[:k]
    idx = idx[probs[idx] > 0]  # species masked out by restrict_to have exactly 0: never listed
    return [(names[i], float(probs[i])) for i in idx]


def _record_for_taxon(catalog: Catalog, rank: str, taxon: str) -> SpeciesRecord | None:
    """A species under the taxon, whose lineage down to ``rank`` describes it."""
    for record in catalog:
        if record.taxonomy.get(rank) == taxon:
            return record
    return None
