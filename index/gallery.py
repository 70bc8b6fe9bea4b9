"""One factory for every gallery backend, named by a ``--gallery`` value.

Each backend is imported only when chosen, so a Milvus deployment never loads
FAISS and a FAISS one never needs pymilvus.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from biolit_id.index.base import GalleryBase, GalleryConfigError, GallerySpace
from biolit_id.index.core.catalog_view import CatalogView
from biolit_id.index.prototypes import PrototypeBuilder

FAISS_KINDS = ("faiss:flat | faiss:ivf-flat,nlist=N,nprobe=N | faiss:ivf-sq8 | "
               "faiss:ivf-pq | faiss:auto")


def open_gallery(uri: str, *, data_dir: str | Path, catalog: CatalogView,
                 builder: PrototypeBuilder, space: GallerySpace,
                 snapshot_every: int | None = None, refine_every: float = 0.0,
                 exclusive: bool = False) -> GalleryBase:
    """``faiss[:KIND,...]``, ``milvus-lite:PATH`` or ``milvus://HOST:PORT/COLLECTION``.

    ``refine_every`` > 0: refine drifted prototypes in the background at that
    period (for Milvus it replaces the URI's ``refine=``; 0 leaves that option).
    ``exclusive``: hold a FAISS gallery alone (``gallery rebuild``); Milvus ignores it.
    """
    uri = uri or "faiss"
    common = dict(catalog=catalog, builder=builder, space=space)
    if uri.startswith("milvus"):
        from biolit_id.index.milvus.gallery import MilvusGallery
        from biolit_id.index.milvus.target import parse_target

        target = parse_target(uri)
        if refine_every > 0:
            target = replace(target, refine_seconds=float(refine_every))
        return MilvusGallery(target, **common)
    backend, _, options = uri.partition(":")
    if backend != "faiss":
        raise GalleryConfigError(
            f"gallery backend {backend!r} is not available here; use faiss "
            f"(optionally {FAISS_KINDS}) or milvus-lite:PATH | milvus://HOST:PORT/COLLECTION"
        )
    from biolit_id.index.faiss.gallery import DEFAULT_SNAPSHOT_EVERY, FaissGallery
    from biolit_id.index.faiss.vector_index import IndexSpec

    gallery = FaissGallery(Path(data_dir) / "gallery",
                           index_spec=IndexSpec.parse(options or "flat"),
                           snapshot_every=snapshot_every or DEFAULT_SNAPSHOT_EVERY,
                           exclusive=exclusive, **common)
    gallery.start_refiner(refine_every)
    return gallery
