"""Build the embedder for an explicit runtime and precision.

Exported runtimes are exported/converted once (cached), then loaded;
``auto`` lives in ``auto.py`` and calls this for each candidate.
"""

from __future__ import annotations

from pathlib import Path

from biolit_id.server.inference.embedders.base import (
    PRECISIONS,
    RUNTIMES,
    Embedder,
    RuntimeUnavailableError,
    require,
)
from biolit_id.server.inference.embedders.eager import TorchEmbedder
from biolit_id.server.inference.embedders.export import (
    artifact_root,
    convert_openvino,
    export_onnx,
    quantize_onnx_int8,
    quantize_openvino_int8,
)
from biolit_id.server.inference.embedders.onnx import OnnxEmbedder
from biolit_id.server.inference.embedders.openvino import (
    LATENCY,
    THROUGHPUT,
    OpenVinoEmbedder,
    ThroughputOpenVinoEmbedder,
)
from biolit_id.server.inference.model_loader import LoadedModel


def make_embedder(
    loaded: LoadedModel,
    runtime: str = "torch",
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    calibration_dir: Path | None = None,
) -> Embedder:
    """Any runtime by name; exported ones are cached under ``cache_dir``."""
    if runtime == "torch":
        return TorchEmbedder(loaded, precision)
    if runtime in {"onnx", LATENCY, THROUGHPUT}:
        return make_exported_embedder(loaded, runtime, precision, cache_dir, calibration_dir)
    raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


def make_exported_embedder(
    loaded: LoadedModel,
    runtime: str,
    precision: str,
    cache_dir: str | Path | None,
    calibration_dir: Path | None = None,
) -> Embedder:
    """Export/convert once (cached), then load the runtime's session."""
    if precision not in PRECISIONS:
        raise RuntimeUnavailableError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    dim = loaded.embedding_dim
    if runtime == "onnx":
        require("onnxruntime", "onnx")
        if precision == "bf16":
            raise RuntimeUnavailableError(
                "ONNX Runtime has no fast bf16 path on CPU; use --runtime openvino "
                "--precision bf16 (or torch bf16), or onnx with fp32/int8"
            )
        path = quantize_onnx_int8(loaded, cache_dir) if precision == "int8" else (
            export_onnx(loaded, cache_dir)
        )
        return OnnxEmbedder(path, precision, dim)
    if runtime in (LATENCY, THROUGHPUT):
        require("openvino", "openvino")
        if precision == "int8":
            path = quantize_openvino_int8(loaded, cache_dir, calibration_dir)
        else:
            path = convert_openvino(loaded, cache_dir)
        kind = ThroughputOpenVinoEmbedder if runtime == THROUGHPUT else OpenVinoEmbedder
        # Both modes compile the same IR; only the compile settings differ.
        return kind(path, precision, dim,
                    compile_cache=artifact_root(loaded, cache_dir) / "ov-cache")
    raise RuntimeUnavailableError(
        f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}"
    )
