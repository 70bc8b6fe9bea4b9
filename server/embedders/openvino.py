"""OpenVINO on CPU with an explicit precision hint and thread count.

OpenVINO silently runs bf16 on CPUs that have it, so the hint is always set
(f32 when fp32 is asked) and the compiled precision can be read back.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from biolit_id.core.vectors import l2_normalize
from biolit_id.server.embedders.base import RuntimeUnavailableError, require
from biolit_id.server.embedders.threads import model_threads


class OpenVinoEmbedder:
    runtime = "openvino"

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
        config = {
            "INFERENCE_PRECISION_HINT": hint,
            "INFERENCE_NUM_THREADS": threads or model_threads(),
            "PERFORMANCE_HINT": "LATENCY",  # one stream: the batcher makes the batches
            "NUM_STREAMS": 1,
        }
        self._compiled = core.compile_model(str(path), "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()
        self.precision = precision
        self.embedding_dim = embedding_dim
        self.inference_precision = hint
        self.path = path

    @property
    def compiled_precision(self) -> str:
        """What OpenVINO actually runs non-quantised layers in ("f32", "bf16")."""
        return self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        with self._lock:  # one infer request; the batcher serialises calls anyway
            out = self._request.infer({0: x})
            result = np.array(out[self._compiled.output(0)], dtype=np.float32)
        return l2_normalize(result)
