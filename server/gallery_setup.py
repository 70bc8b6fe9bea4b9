"""Wires a gallery backend to the loaded model, bundle and catalog.

The gallery knows nothing of scorers or bundles: here they become a
``PrototypeBuilder`` (how to compute a species' prototype) and a
``GallerySpace`` (where vectors live), the same for every backend so FAISS
and Milvus compute identical prototypes.
"""

from __future__ import annotations

import hashlib

import numpy as np

from biolit_id.index.backends import GallerySpace, open_backend
from biolit_id.index.base import GalleryBase
from biolit_id.index.core.types import PrototypeSet
from biolit_id.index.prototypes import PrototypeBuilder
from biolit_id.server.catalog.catalog import Catalog


def open_gallery(config, *, model, catalog: Catalog, scorer, text_cache,
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
    return open_backend(config.gallery, data_dir=config.data_dir, catalog=catalog,
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
        source=f"bundle:{bundle.bundle_id}",
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
