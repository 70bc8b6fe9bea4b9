"""Opening galleries, FAISS or Milvus, the way ``build_state`` does, for tests without gRPC.

Each open loads a fresh catalog, as a restart would, so a test can check
what a gallery recovers from its own storage. ``whitened_bundle`` gives a
small hybrid bundle with a random whitening into 64 dimensions, so that the
gallery's scoring space differs from the raw embedding space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biolit_id.index.core.vectors import fuse_prototypes
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.config import ServerConfig
from biolit_id.server.decision.bundle import DEFAULT_HEAD, Bundle
from biolit_id.server.decision.head import build_head, head_state_from_module
from biolit_id.server.decision.seed_cascade import SeedCascadeScorer
from biolit_id.server.decision.types import Thresholds
from biolit_id.server.decision.zero_shot import ZeroShotScorer
from biolit_id.server.wiring import initial_prototypes, open_service_gallery

DIM = 512
WHITENED_DIM = 64


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def open_test_gallery(gallery: str, data_dir: Path, model, text_cache,
                      bundle: Bundle | None = None, **extra):
    """``gallery`` is a ``--gallery`` value (``faiss:...``, ``milvus-lite:...``);
    ``extra`` goes to ``ServerConfig.extra``; without a bundle the gallery is zero-shot."""
    catalog = Catalog.load_default()
    scorer = SeedCascadeScorer(bundle) if bundle is not None else ZeroShotScorer()
    base = initial_prototypes(catalog, scorer, text_cache)
    config = ServerConfig(model=model.spec, data_dir=data_dir, gallery=gallery, extra=extra)
    return open_service_gallery(config, model=model, catalog=catalog, scorer=scorer,
                                text_cache=text_cache, base=base)


def whitened_bundle(model, catalog: Catalog, text_cache, *, extra: dict,
                    bundle_id: str) -> Bundle:
    """Bundle over the catalog's first 12 species (6 common), alpha 0.8, seeded whitening."""
    dim_out = WHITENED_DIM
    rng = np.random.default_rng(0)
    species = catalog.names()[:12]
    common = species[:6]
    mu = (0.01 * rng.normal(size=(1, DIM))).astype(np.float32)
    w = (rng.normal(size=(DIM, dim_out)) / np.sqrt(DIM)).astype(np.float32)
    bundle = Bundle(
        model_id=model.spec, model_fingerprint=model.fingerprint, embedding_dim=DIM,
        species=species, common=common, head_config=DEFAULT_HEAD,
        head_state=head_state_from_module(build_head(DIM, len(common))),
        visual_prototypes=unit(rng.normal(size=(len(species), dim_out))),
        text_prototypes=np.zeros((len(species), dim_out), np.float32),
        prototypes=np.zeros((len(species), dim_out), np.float32),
        whitening_mu=mu, whitening_W=w, temperature=23.8, alpha=0.8, thresholds=Thresholds(),
        extra=extra, bundle_id=bundle_id,
    )
    text = text_cache.embed([catalog.get(n).prompt() for n in species])
    bundle.text_prototypes = bundle.whiten(text)
    bundle.prototypes = fuse_prototypes(bundle.visual_prototypes, bundle.text_prototypes, 0.8)
    return bundle
