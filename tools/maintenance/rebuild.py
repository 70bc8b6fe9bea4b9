"""``biolit-id gallery rebuild``: refine every prototype and rebuild the FAISS index, offline.

An add or a removal moves a species' prototype through running sums, in O(1).
This command runs the full similarity-weighted refinement from every photo
instead. For FAISS it then retrains and refills the vector index from the
store: for IVF it draws the training ids first and reads only those photos to
train, then adds every photo in chunks, so memory follows the training sample
rather than the gallery. A FAISS gallery must be free of servers (its owner
lock, index/faiss/lock.py). A Milvus gallery keeps serving: the refined
species rows are written, and replicas install them at their next sync.
docs/gallery.md ("Rebuilding and refining").
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from biolit_id.index.base import GalleryBase


def add_rebuild_arguments(sub) -> None:
    """Register ``gallery rebuild`` on gallery_cli's parser (no server call)."""
    from biolit_id.server.inference.model_loader import DEFAULT_MODEL

    rebuild = sub.add_parser(
        "rebuild", help="refine every prototype from all its photos and rebuild the FAISS "
                        "index (FAISS: with the server stopped; Milvus: while it serves)")
    rebuild.add_argument("--gallery", default="faiss",
                         help="the servers' --gallery: faiss[:KIND,...] (the --data-dir store) "
                              "| milvus-lite:PATH | milvus://HOST:PORT/NAME "
                              "(default: %(default)s)")
    rebuild.add_argument("--model", default=DEFAULT_MODEL, help="the servers' model")
    rebuild.add_argument("--bundle", type=Path, help="the servers' bundle (hybrid mode)")
    rebuild.add_argument("--data-dir", type=Path, default=Path("./data"),
                         help="the servers' --data-dir (default: %(default)s)")
    rebuild.add_argument("--species", action="append", default=[], metavar="NAME",
                         help="refine only this species (repeatable; default: every species "
                              "with photos)")
    rebuild.add_argument("--no-index", action="store_true",
                         help="refine the prototypes only, keep the FAISS index")
    rebuild.add_argument("--no-progress", action="store_true")


@dataclass(frozen=True)
class RebuildSummary:
    species: int  # prototypes refined
    vectors: int | None  # photos in the rebuilt FAISS index; None: not rebuilt
    index: str  # what the index is now, in words
    seconds: float
    peak_rss_bytes: int


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_rebuild(args: argparse.Namespace) -> int:
    from biolit_id.index.base import (
        GalleryConfigError,
        GalleryError,
        GalleryInUseError,
    )
    from biolit_id.index.store import StoreError
    from biolit_id.server.decision.bundle import BundleError
    from biolit_id.server.inference.model_loader import ModelUnavailableError

    started = time.perf_counter()
    try:
        gallery = open_offline_gallery(args.gallery, args.model, args.bundle, args.data_dir)
    except GalleryInUseError as exc:
        print(f"biolit-id gallery rebuild: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, StoreError, GalleryConfigError, GalleryError, BundleError,
            ModelUnavailableError) as exc:
        print(f"biolit-id gallery rebuild: {exc}", file=sys.stderr)
        return 1
    try:
        unknown = [n for n in args.species if not gallery.knows(n)]
        if unknown:
            print(f"biolit-id gallery rebuild: unknown species {', '.join(unknown)} (neither "
                  "in the catalog nor added at runtime)", file=sys.stderr)
            return 2
        summary = rebuild(gallery, args.species or None, index=not args.no_index,
                          progress=not args.no_progress, started=started)
    except (OSError, StoreError, GalleryError) as exc:
        print(f"biolit-id gallery rebuild: {exc}", file=sys.stderr)
        return 1
    finally:
        gallery.close()
    print(f"refined {summary.species} species; index: {summary.index}; "
          f"{summary.seconds:.1f} s; peak RSS {summary.peak_rss_bytes / 2**20:.0f} MiB")
    return 0


def open_offline_gallery(gallery: str, model_spec: str, bundle_path: Path | None,
                         data_dir: Path, model=None) -> GalleryBase:
    """The gallery as the servers open it (same model, bundle and catalog), for one writer.

    FAISS: held exclusively, so GalleryInUseError while a server has it. Milvus:
    without its sync thread. ``model``: already loaded from ``model_spec``.
    """
    from biolit_id.server.catalog.store import load_catalog
    from biolit_id.server.config import ServerConfig
    from biolit_id.server.decision.bundle import load_bundle
    from biolit_id.server.decision.registry import scorer_for
    from biolit_id.server.inference.model_loader import load_model
    from biolit_id.server.inference.text_prototypes import TextPrototypeCache
    from biolit_id.server.wiring import initial_prototypes, open_service_gallery

    gallery = gallery or "faiss"
    if gallery.startswith("milvus"):
        gallery += ("&" if "?" in gallery else "?") + "poll=0"  # a one-shot writer
    model = model if model is not None else load_model(model_spec)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog(data_dir)
    bundle = (load_bundle(bundle_path, model.fingerprint, model.embedding_dim)
              if bundle_path is not None else None)
    scorer = scorer_for(bundle)
    text_cache = TextPrototypeCache(model, data_dir)
    base = initial_prototypes(catalog, scorer, text_cache)
    config = ServerConfig(model=model_spec, data_dir=data_dir, bundle=bundle_path,
                          gallery=gallery)
    return open_service_gallery(config, model=model, catalog=catalog, scorer=scorer,
                        text_cache=text_cache, base=base, exclusive=True)


def rebuild(gallery: GalleryBase, species: Sequence[str] | None = None, *, index: bool = True,
            progress: bool = True, started: float | None = None) -> RebuildSummary:
    """Refine ``species`` (default: every species with photos), then rebuild a FAISS index.

    One species at a time, so that a Milvus replica's reads wait for one species'
    photos at most, and memory holds one species' photos.
    """
    started = time.perf_counter() if started is None else started
    names = list(gallery.exemplar_counts()) if species is None else list(species)
    refined = 0
    for name in tqdm(names, unit="species", desc="refine", disable=not progress):
        refined += len(gallery.refine([name]))
    vectors, described = None, "Milvus maintains its own (replicas sync the refined rows)"
    if gallery.backend == "faiss":
        if not index:
            described = f"kept ({gallery.index.spec.describe()})"
        elif gallery.recovery == "rebuild":  # opening found no usable snapshot: just built
            vectors = gallery.index.exemplar_count
            described = f"{vectors} photos, {gallery.index.spec.describe()} (built while opening)"
        else:
            vectors = gallery.rebuild_index(progress=progress)
            described = f"{vectors} photos, {gallery.index.spec.describe()}"
    return RebuildSummary(refined, vectors, described, time.perf_counter() - started,
                          peak_rss_bytes())
