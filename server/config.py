"""Server settings, one place, with the defaults a 2-core CPU wants."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from biolit_id.server.inference.model_loader import DEFAULT_MODEL


@dataclass
class ServerConfig:
    model: str = DEFAULT_MODEL
    data_dir: Path = Path("./data")
    host: str = "127.0.0.1"
    port: int = 50051
    bundle: Path | None = None
    runtime: str = "torch"
    precision: str = "fp32"
    fast_decode: bool = True
    # gRPC worker threads: decoding and scoring run in them while the model
    # batches; more than a few per core only adds contention.
    max_workers: int = 8
    max_message_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    # Micro-batching of image embeddings across concurrent calls.
    max_batch_size: int = 8
    max_batch_wait_ms: float = 5.0
    max_queue_size: int = 64
    # Threads for the model's own kernels (intra-op); 0 = one per core.
    model_threads: int = 0
    # Photos decoded at once (0 = one per gRPC worker): fewer leave the model's
    # threads their cores on a small machine (docs/performance.md).
    decode_threads: int = 0
    # FAISS (OpenMP) threads per search. 1: searches run one query each in gRPC
    # threads next to the model; OpenMP teams on 2 busy cores measured ~10x slower.
    search_threads: int = 1
    # Photos of one IdentifyStream decoded/queued concurrently; 0 = max_batch_size.
    stream_read_ahead: int = 0
    # Client streams (AddExemplars, IdentifyStream) open at once; each holds a worker
    # thread while it waits for its client, so 0 = half of max_workers, leaving the
    # rest to unary calls. A stream whose client sends nothing this long is cancelled.
    max_streams: int = 0
    stream_idle_timeout_s: float = 60.0
    # Real photos for the runtime fidelity gate and int8 calibration (else synthetic).
    calibration_dir: Path | None = None
    gallery: str = "faiss"
    # Background refinement of drifted prototypes every N seconds (0 = off; for Milvus,
    # > 0 replaces the URI's refine= option). docs/gallery.md ("Rebuilding and refining").
    gallery_refine_every: float = 0.0
    gbif_url: str | None = None
    api_keys: Path | None = None
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int | None = None
    # The web page and JSON API (biolit_id.server.web), same host, keys and TLS
    # as gRPC; None = off, 0 = a free port.
    http_port: int | None = None
    grace_seconds: float = 10.0
    extra: dict = field(default_factory=dict)

    @property
    def stream_limit(self) -> int:
        return self.max_streams or max(1, self.max_workers // 2)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
