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

import numpy as np

from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.index.core.types import PrototypeSet
from biolit_id.index.core.vectors import l2_normalize
from biolit_id.server.catalog.catalog import Catalog, UnknownTaxonError
from biolit_id.server.decision.answers import explain
from biolit_id.server.decision.types import Identification, NeighbourFn, Scorer
from biolit_id.server.inference.embedders.base import Embedder
from biolit_id.server.inference.preprocess import ImagePolicy, preprocess
from biolit_id.server.inference.types import (
    DEFAULT_TOP_K,
    MAX_NUM_SIMILAR,
    MAX_RESTRICT_TO,
    MAX_TOP_K,
    IdentifyOptions,
    SimilarSearch,
)


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
            result = explain(scores, protos, self.catalog, self.scorer.bundle, opts.top_k)
            result = self.scorer.explain(result, scores, protos, self.catalog, row[None, :])
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

