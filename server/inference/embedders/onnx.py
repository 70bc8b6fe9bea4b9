"""ONNX Runtime on CPU: fp32 (the plain export) or int8 (dynamic QInt8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biolit_id.index.core.vectors import l2_normalize
from biolit_id.server.inference.embedders.base import require
from biolit_id.server.inference.embedders.threads import model_threads


class OnnxEmbedder:
    """One sequential session using every model thread; the batcher makes the batches."""

    runtime = "onnx"

    def __init__(self, path: Path, precision: str, embedding_dim: int,
                 threads: int | None = None) -> None:
        ort = require("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or model_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers would steal the cores that gRPC threads decode photos on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self.precision = precision
        self.embedding_dim = embedding_dim
        self.path = path

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        return l2_normalize(self._session.run(None, {self._input: x})[0])
