"""Everything a running service holds, built once at start-up, its gallery included."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biolit_id.index.base import GalleryBase, GallerySpace
from biolit_id.index.core.types import PrototypeSet
from biolit_id.index.gallery import open_gallery
from biolit_id.index.prototypes import PrototypeBuilder
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.catalog.store import load_catalog
from biolit_id.server.config import ServerConfig
from biolit_id.server.decision.bundle import Bundle, load_bundle
from biolit_id.server.decision.fused import gallery_neighbours
from biolit_id.server.decision.observations import ObservationSetup, load_observation_setup
from biolit_id.server.decision.rank_heads_scorer import with_rank_heads
from biolit_id.server.decision.registry import scorer_for
from biolit_id.server.decision.types import Scorer
from biolit_id.server.inference.batcher import MicroBatcher
from biolit_id.server.inference.embedders.auto import build_embedder
from biolit_id.server.inference.embedders.base import Embedder
from biolit_id.server.inference.embedders.threads import configure_threads
from biolit_id.server.inference.model_loader import LoadedModel, load_model
from biolit_id.server.inference.pipeline import Identifier
from biolit_id.server.inference.preprocess import ImagePolicy
from biolit_id.server.inference.text_prototypes import TextPrototypeCache

log = logging.getLogger(__name__)
SERVICE_VERSION = "0.1.0"


@dataclass
class ServiceState:
    config: ServerConfig
    model: LoadedModel
    catalog: Catalog
    embedder: Embedder
    text_cache: TextPrototypeCache
    scorer: Scorer
    bundle: Bundle | None
    identifier: Identifier
    gallery: object | None = None
    batcher: MicroBatcher | None = None
    started_at: float = field(default_factory=time.time)
    observations: ObservationSetup = field(default_factory=ObservationSetup)  # prior, combiner

    def versions(self) -> pb.Versions:
        return pb.Versions(
            model_id=self.model.spec,
            catalog_version=self.catalog.version,
            bundle_id=self.bundle.bundle_id if self.bundle else "",
            service_version=SERVICE_VERSION,
            gallery_version=getattr(self.gallery, "version", 0),
            model_fingerprint=self.model.fingerprint,
            prior_version=self.observations.version,
        )


def policy_for(model: LoadedModel, config: ServerConfig) -> ImagePolicy:
    return ImagePolicy(
        image_size=model.image_size,
        mean=model.mean,
        std=model.std,
        max_pixels=config.max_image_pixels,
        fast_decode=config.fast_decode,
    )


def initial_prototypes(
    catalog: Catalog, scorer: Scorer, text_cache: TextPrototypeCache
) -> PrototypeSet:
    """Zero-shot: the catalog's text prototypes. Hybrid: the bundle's fused ones."""
    bundle = scorer.bundle
    if bundle is None:
        names = catalog.names()
        vectors = text_cache.embed([catalog.get(n).prompt() for n in names])
        return PrototypeSet(tuple(names), vectors, version=0)
    missing = [n for n in bundle.species if n not in catalog]
    if missing:
        log.warning("bundle species missing from the catalog (no taxonomy): %s", missing)
    return PrototypeSet(tuple(bundle.species), bundle.prototypes.astype(np.float32), version=0)


def build_state(config: ServerConfig) -> ServiceState:
    config.data_dir = Path(config.data_dir)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(config.model)
    log.info("loaded %s in %.1f s (fingerprint %s)", config.model, model.load_seconds,
             model.fingerprint)
    catalog = load_catalog(config.data_dir)  # shipped catalog + enrich/AddSpecies overlay
    bundle = None
    if config.bundle is not None:
        bundle = load_bundle(config.bundle, model.fingerprint, model.embedding_dim)
    # the bundle's routing (seed cascade, fused, seed-v2), with its trained rank heads if any
    scorer = with_rank_heads(scorer_for(bundle))
    observations = load_observation_setup(config.bundle, config.data_dir)  # prior, combiner
    text_cache = TextPrototypeCache(model, config.data_dir)
    threads = configure_threads(config.model_threads, config.search_threads)
    embedder = build_embedder(model, config.runtime, config.precision, config.data_dir,
                              config.calibration_dir, batch=config.max_batch_size)
    log.info("image embeddings: %s %s, %s", embedder.runtime, embedder.precision, threads)
    batcher = MicroBatcher(embedder.embed, config.max_batch_size, config.max_batch_wait_ms,
                           config.max_queue_size)
    protos = initial_prototypes(catalog, scorer, text_cache)
    # After the catalog: the gallery adds runtime species to it.
    gallery = open_service_gallery(config, model=model, catalog=catalog, scorer=scorer,
                           text_cache=text_cache, base=protos)
    identifier = Identifier(
        catalog=catalog,
        embedder=embedder,
        scorer=scorer,
        prototypes=gallery.prototypes,
        policy=policy_for(model, config),
        similar_search=gallery.similar_search,
        neighbours=gallery_neighbours(gallery),
        embed_fn=batcher.submit,  # concurrent calls share model batches
        decode_slots=config.decode_threads,
    )
    return ServiceState(
        config=config,
        model=model,
        catalog=catalog,
        embedder=embedder,
        text_cache=text_cache,
        scorer=scorer,
        bundle=bundle,
        identifier=identifier,
        gallery=gallery,
        batcher=batcher,
        observations=observations,
    )


# ------------------------------------------------------------------ the gallery


def open_service_gallery(config, *, model, catalog: Catalog, scorer, text_cache,
                 base: PrototypeSet, exclusive: bool = False) -> GalleryBase:
    """The gallery a ServerConfig names (``--gallery``), over the start-up prototypes.

    ``--gallery-refine-every`` starts its background refiner; ``exclusive``
    (``gallery rebuild``) holds a FAISS gallery with no server beside it.
    """
    builder, space_id = prototype_builder(model=model, catalog=catalog, scorer=scorer,
                                          text_cache=text_cache, base=base)
    space = GallerySpace(model.fingerprint, model.embedding_dim, space_id,
                         scorer.to_prototype_space)
    every = config.extra.get("gallery_snapshot_every")
    return open_gallery(config.gallery, data_dir=config.data_dir, catalog=catalog,
                        builder=builder, space=space,
                        snapshot_every=int(every) if every else None,
                        refine_every=config.gallery_refine_every,
                        exclusive=exclusive)


def prototype_builder(*, model, catalog: Catalog, scorer, text_cache,
                      base: PrototypeSet) -> tuple[PrototypeBuilder, str]:
    """(builder, space id) for the loaded scorer; every gallery backend builds them here.

    One recipe, so that the FAISS and Milvus galleries compute identical
    prototypes. The space id names the space the vectors live in (the bundle's
    whitened space, or the model's raw one, see ``space_id_for``): a snapshot
    or collection made for another space must not be reused.
    """

    def text_for(names: list[str]) -> np.ndarray:
        prompts = [catalog.prompt_for(n) for n in names]
        return scorer.to_prototype_space(text_cache.embed(prompts))

    alpha = float(scorer.alpha)
    bundle = scorer.bundle
    if bundle is None:
        builder = PrototypeBuilder(base_names=base.names, base_vectors=base.vectors,
                                   text_for=text_for, alpha=alpha, text_base=base.vectors,
                                   source=f"zero-shot:{model.fingerprint}")
        return builder, space_id_for(model.fingerprint, None)
    support = bundle.extra.get("prototype_support") or bundle.extra.get("train_counts") or {}
    builder = PrototypeBuilder(
        base_names=base.names, base_vectors=base.vectors, text_for=text_for, alpha=alpha,
        visual_prior=bundle.visual_prototypes, text_base=bundle.text_prototypes,
        prior_weights={str(k): float(v) for k, v in support.items()},
        source=f"bundle:{bundle.bundle_id}", iterations=bundle.prototype_iterations,
    )
    return builder, space_id_for(model.fingerprint, bundle)


def space_id_for(model_fingerprint: str, bundle) -> str:
    """``raw:<model>``, or ``whitened:<digest>`` of the bundle's whitening.

    Not the bundle id: that digests the whole weights file, which
    ``biolit-id calibrate`` rewrites (it rescales the head) while the
    whitening, hence every stored vector, stays valid. A bundle without
    whitening scores in the raw space (unit embeddings), like zero-shot.
    """
    if bundle is None or bundle.whitening_W is None:
        return f"raw:{model_fingerprint}"
    h = hashlib.sha256(model_fingerprint.encode("utf-8") + b"\0")
    for tensor in (bundle.whitening_mu, bundle.whitening_W):
        arr = np.ascontiguousarray(tensor, dtype="<f4")
        h.update(repr(arr.shape).encode("ascii"))
        h.update(arr.tobytes())
    return f"whitened:{h.hexdigest()[:16]}"
