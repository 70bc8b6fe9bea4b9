"""OpenVINO on CPU with an explicit precision hint and thread count.

OpenVINO silently runs bf16 on CPUs that have it, so the hint is always set
(f32 when fp32 is asked) and the compiled precision can be read back.

Two modes. ``openvino`` compiles for latency: one stream, one request, every
thread on one batch. ``openvino-throughput`` compiles with OpenVINO's
throughput hint (several streams, each with its own threads) and splits each
batch from the service's batcher across that many infer requests, so the
parts of one batch run side by side; which one is faster depends on the CPU,
so ``auto`` times both (docs/performance.md).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from biolit_id.index.core.vectors import l2_normalize
from biolit_id.server.inference.embedders.base import RuntimeUnavailableError, require
from biolit_id.server.inference.embedders.threads import model_threads

LATENCY = "openvino"
THROUGHPUT = "openvino-throughput"


class OpenVinoEmbedder:
    runtime = LATENCY

    def __init__(self, path: Path, precision: str, embedding_dim: int,
                 threads: int | None = None, compile_cache: Path | None = None) -> None:
        ov = require("openvino", "openvino")
        core = ov.Core()
        if compile_cache is not None:
            # Compiled blobs cached on disk: the second start skips graph compilation.
            compile_cache.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(compile_cache)})
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if precision == "bf16" and "BF16" not in caps:
            raise RuntimeUnavailableError(
                "this CPU has no native bf16 (OpenVINO reports "
                f"{', '.join(caps)}); use --precision fp32 or int8"
            )
        # int8 layers run in int8 whatever the hint; the hint sets the rest.
        hint = "f32" if precision == "fp32" else ("bf16" if "BF16" in caps else "f32")
        config = {"INFERENCE_PRECISION_HINT": hint,
                  "INFERENCE_NUM_THREADS": threads or model_threads(),
                  **self._performance_config()}
        self._compiled = core.compile_model(str(path), "CPU", config)
        self._lock = threading.Lock()
        self._setup_requests()
        self.precision = precision
        self.embedding_dim = embedding_dim
        self.inference_precision = hint
        self.path = path

    def _performance_config(self) -> dict:
        return {"PERFORMANCE_HINT": "LATENCY",  # one stream: the batcher makes the batches
                "NUM_STREAMS": 1}

    def _setup_requests(self) -> None:
        self._request = self._compiled.create_infer_request()

    @property
    def compiled_precision(self) -> str:
        """What OpenVINO actually runs non-quantised layers in ("f32", "bf16")."""
        return self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    @property
    def streams(self) -> int:
        """Streams the compiled model runs (one in latency mode)."""
        return int(self._compiled.get_property("NUM_STREAMS"))

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        with self._lock:  # one infer request; the batcher serialises calls anyway
            out = self._request.infer({0: x})
            result = np.array(out[self._compiled.output(0)], dtype=np.float32)
        return l2_normalize(result)


class ThroughputOpenVinoEmbedder(OpenVinoEmbedder):
    """Throughput hint: one batch split over the compiled model's parallel streams."""

    runtime = THROUGHPUT

    def _performance_config(self) -> dict:
        return {"PERFORMANCE_HINT": "THROUGHPUT"}  # OpenVINO sizes streams for this CPU

    def _setup_requests(self) -> None:
        from openvino import AsyncInferQueue

        self.requests = max(1, int(self._compiled.get_property(
            "OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._queue = AsyncInferQueue(self._compiled, self.requests)
        self._parts: list[np.ndarray | None] = []
        self._queue.set_callback(self._collect)

    def _collect(self, request, index: int) -> None:
        self._parts[index] = np.array(request.get_output_tensor(0).data, dtype=np.float32)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        chunks = [c for c in np.array_split(x, min(self.requests, len(x))) if len(c)]
        with self._lock:  # wait_all waits for every job in the queue: one batch at a time
            self._parts = [None] * len(chunks)
            for i, chunk in enumerate(chunks):
                self._queue.start_async({0: np.ascontiguousarray(chunk)}, userdata=i)
            self._queue.wait_all()
            parts, self._parts = self._parts, []
        if any(p is None for p in parts):
            raise RuntimeError("an OpenVINO infer request returned no output")
        return l2_normalize(np.concatenate(parts))
