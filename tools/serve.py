"""``biolit-id serve``: run the identification service."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from biolit_id.server.config import ServerConfig
from biolit_id.server.inference.embedders.base import PRECISIONS, RUNTIMES
from biolit_id.server.inference.model_loader import DEFAULT_MODEL, ModelUnavailableError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="hf-hub:ORG/REPO or local-dir:PATH (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=defaults.data_dir,
                        help="gallery store, caches and exports (default: %(default)s)")
    parser.add_argument("--host", default=defaults.host,
                        help="interface to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--bundle", type=Path, help="trained bundle directory (hybrid mode)")
    # The CLI deploys the fastest path that passes the fidelity gate (auto); the
    # library default (ServerConfig) stays on the torch fp32 reference.
    parser.add_argument("--runtime", choices=("auto", *RUNTIMES),
                        default="auto",
                        help="image-tower runtime; auto = fastest passing the fidelity gate "
                             "(see docs/performance.md) (default: %(default)s)")
    parser.add_argument("--precision", choices=("auto", *PRECISIONS),
                        default="auto",
                        help="auto picks int8 only on CPUs with AMX int8, through the same "
                             "gate; check it with biolit-id check-runtime (default: %(default)s)")
    parser.add_argument("--calibration-dir", type=Path,
                        help="real photos for the fidelity gate and int8 calibration")
    parser.add_argument("--no-fast-decode", dest="fast_decode", action="store_false",
                        help="decode JPEGs at full size (slower, bit-exact with the seed)")
    parser.add_argument("--max-workers", type=int, default=defaults.max_workers)
    parser.add_argument("--max-message-bytes", type=int, default=defaults.max_message_bytes)
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-batch-wait-ms", type=float, default=defaults.max_batch_wait_ms)
    parser.add_argument("--max-queue-size", type=int, default=defaults.max_queue_size)
    parser.add_argument("--model-threads", type=int, default=defaults.model_threads,
                        help="intra-op threads for the model (0 = one per core)")
    parser.add_argument("--decode-threads", type=int, default=defaults.decode_threads,
                        help="photos decoded at once (0 = one per call; default: %(default)s)")
    parser.add_argument("--search-threads", type=int, default=defaults.search_threads,
                        help="FAISS threads per search (default: %(default)s)")
    parser.add_argument("--stream-read-ahead", type=int, default=defaults.stream_read_ahead,
                        help="photos of one IdentifyStream in flight (0 = max batch size)")
    parser.add_argument("--max-streams", type=int, default=defaults.max_streams,
                        help="client streams open at once (0 = half of --max-workers)")
    parser.add_argument("--stream-idle-timeout", dest="stream_idle_timeout_s", type=float,
                        default=defaults.stream_idle_timeout_s,
                        help="cancel a stream whose client sends nothing this long "
                             "(seconds; default: %(default)s)")
    parser.add_argument("--gallery", default=defaults.gallery,
                        help="faiss (default) | milvus-lite:PATH | milvus://HOST:PORT/COLLECTION")
    parser.add_argument("--gallery-refine-every", type=float, metavar="SECONDS",
                        default=defaults.gallery_refine_every,
                        help="refine drifted species' prototypes from all their photos in "
                             "the background at this period; 0 = off (default: %(default)s; "
                             "for Milvus it replaces the URI's refine=)")
    parser.add_argument("--gbif-url", help="GBIF API base URL, for AddSpecies look-ups")
    parser.add_argument("--api-keys", type=Path, help="file of '<role> <key>' lines")
    parser.add_argument("--insecure", action="store_true",
                        help="allow binding a non-loopback interface without API keys")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics here")
    parser.add_argument("--http-port", type=int, default=defaults.http_port,
                        help="also serve the web page and the JSON API (/v1/) here, same "
                             "host, keys and TLS as gRPC; 0 = a free port (default: off; "
                             "tools/dev.sh serve turns it on at 8080)")
    parser.add_argument("--no-http", dest="http_port", action="store_const", const=None,
                        help="no web page and JSON API (undoes an earlier --http-port)")
    parser.add_argument("--grace-seconds", type=float, default=defaults.grace_seconds,
                        help="how long SIGTERM waits for in-flight calls")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    fields = ServerConfig.__dataclass_fields__
    return ServerConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run(args: argparse.Namespace) -> int:
    from biolit_id.index.base import GalleryConfigError, GalleryError
    from biolit_id.index.faiss.vector_index import IndexSpecError
    from biolit_id.index.store import StoreError
    from biolit_id.server.app import serve_forever
    from biolit_id.server.catalog.store import CatalogStoreError
    from biolit_id.server.decision.bundle import BundleError
    from biolit_id.server.grpc.auth import SecurityConfigError
    from biolit_id.server.inference.embedders.base import RuntimeUnavailableError
    from biolit_id.server.web.runner import HttpStartError

    # Set-up errors a user can fix: one clear line, no traceback.
    try:
        serve_forever(config_from_args(args))
    except (ModelUnavailableError, BundleError, SecurityConfigError, RuntimeUnavailableError,
            CatalogStoreError, StoreError, GalleryConfigError, GalleryError,
            IndexSpecError, HttpStartError) as exc:
        print(f"biolit-id serve: {exc}", file=sys.stderr)
        return 1
    return 0
