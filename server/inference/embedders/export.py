"""Export the image tower once per model: ONNX, int8 ONNX, OpenVINO IR, int8 IR.

Artifacts are cached in the data dir, keyed by the model's fingerprint, so a
restart only loads files:

    <data_dir>/runtimes/<fingerprint>-v<EXPORT_VERSION>/
        onnx-fp32/model.onnx        exported graph (the input of the others)
        onnx-int8-<s8|u8>/model.onnx  onnxruntime dynamic quantisation (weight type per CPU)
        openvino-fp32/model.xml     converted from the ONNX file (bf16 is a compile hint)
        openvino-int8-<calib>-<s8|s7>/  NNCF post-training quantisation on a calibration set

Each folder is built under a temporary name and renamed into place, so two
processes starting at once never read a half-written model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from biolit_id.index.core.digest import file_sha256
from biolit_id.server.inference.embedders.base import RuntimeUnavailableError, require
from biolit_id.server.inference.embedders.calibration import calibration_pixels, calibration_tag
from biolit_id.server.inference.embedders.hardware import cpu_has_vnni
from biolit_id.server.inference.model_loader import LoadedModel

log = logging.getLogger(__name__)

EXPORT_VERSION = 2  # 2: int8 ONNX weight type chosen per CPU (see onnx_int8_weight_type)
ONNX_OPSET = 18

_export_lock = threading.Lock()


def artifact_root(loaded: LoadedModel, cache_dir: str | Path | None) -> Path:
    """The folder holding every artifact (and gate/auto record) of one model."""
    base = Path(cache_dir) if cache_dir else Path("./data")
    return base / "runtimes" / f"{loaded.fingerprint}-v{EXPORT_VERSION}"


def build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` and rename the folder into place; reuse what exists
    when its files still match their checksums, else rebuild it (a log line says so)."""
    with _export_lock:
        if final.is_dir():
            damage = _damage(final)
            if damage is None:
                return final
            log.warning("runtime export %s is corrupt (%s); rebuilding it from the model",
                        final, damage)
            shutil.rmtree(final, ignore_errors=True)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            _write_checksums(tmp)
            try:
                tmp.rename(final)
            except OSError:  # another process won the race; its copy is as good
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


CHECKSUMS = "checksums.json"


def _write_checksums(folder: Path) -> None:
    """SHA-256 of every file the build wrote, checked each time the export is reused."""
    sums = {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1), "utf-8")


def _damage(folder: Path) -> str | None:
    """Why ``folder`` cannot be trusted (truncated, flipped bits, files missing), or None."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text("utf-8"))
    except (OSError, ValueError):
        return f"{CHECKSUMS} is missing or unreadable"
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its checksum"
    return None


def _image_tower(visual):
    """The visual tower alone as a module: pixels -> raw embedding (normalised in numpy)."""
    import torch

    class ImageTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = visual

        def forward(self, pixels):
            return self.visual(pixels)

    return ImageTower().eval()


def export_onnx(loaded: LoadedModel, cache_dir: str | Path | None) -> Path:
    """The fp32 ONNX graph of the image tower (dynamic batch axis, opset 18), exported once.

    ``dynamo=True`` export from the loaded open_clip module; OpenVINO converts
    this file because converting the torch module directly failed for
    open_clip's ViT.
    """

    def build(tmp: Path) -> None:
        import torch

        require("onnx", "onnx")
        require("onnxscript", "onnx")
        log.info("exporting %s to ONNX (once; cached under %s)", loaded.spec, tmp.parent)
        started = time.perf_counter()
        size = loaded.image_size
        example = torch.zeros(2, 3, size, size)
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(
            _image_tower(loaded.model.visual),
            (example,),
            str(tmp / "model.onnx"),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=["pixels"],
            output_names=["embedding"],
            dynamic_shapes={"pixels": {0: batch}},
            external_data=False,
            verbose=False,
        )
        _write_meta(tmp, loaded, "onnx", "fp32", time.perf_counter() - started)

    return build_atomically(artifact_root(loaded, cache_dir) / "onnx-fp32", build) / "model.onnx"


def onnx_int8_weight_type() -> str:
    """``s8`` where the CPU has VNNI/AMX, else ``u8``.

    ONNX Runtime's fast u8 x s8 kernel on AVX2 without VNNI adds pairs of
    products in saturating int16, which broke the fidelity gate; u8 x u8
    weights do not saturate (docs/performance.md has the cosines). With
    VNNI the u8 x s8 path is exact and the fastest.
    """
    return "s8" if cpu_has_vnni() else "u8"


def quantize_onnx_int8(loaded: LoadedModel, cache_dir: str | Path | None,
                       weight_type: str | None = None) -> Path:
    """Dynamic int8 (int8 weights, activations quantised on the fly): no calibration."""
    source = export_onnx(loaded, cache_dir)
    kind = weight_type or onnx_int8_weight_type()
    if kind not in ("s8", "u8"):
        raise ValueError(f"int8 weight type must be s8 or u8, not {kind!r}")

    def build(tmp: Path) -> None:
        require("onnxruntime", "onnx")
        from onnxruntime.quantization import QuantType, quantize_dynamic

        started = time.perf_counter()
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.ERROR))  # the quantiser logs every tensor at INFO
        try:
            quantize_dynamic(
                str(source), str(tmp / "model.onnx"),
                weight_type=QuantType.QInt8 if kind == "s8" else QuantType.QUInt8,
            )
        finally:
            root.setLevel(level)
        _write_meta(tmp, loaded, "onnx", "int8", time.perf_counter() - started,
                    weight_type=kind)

    final = artifact_root(loaded, cache_dir) / f"onnx-int8-{kind}"
    return build_atomically(final, build) / "model.onnx"


def convert_openvino(loaded: LoadedModel, cache_dir: str | Path | None) -> Path:
    """OpenVINO IR converted from the ONNX export (weights kept in fp32)."""
    source = export_onnx(loaded, cache_dir)

    def build(tmp: Path) -> None:
        ov = require("openvino", "openvino")
        started = time.perf_counter()
        model = ov.convert_model(str(source))
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        _write_meta(tmp, loaded, "openvino", "fp32", time.perf_counter() - started)

    final = artifact_root(loaded, cache_dir) / "openvino-fp32"
    return build_atomically(final, build) / "model.xml"


def quantize_openvino_int8(loaded: LoadedModel, cache_dir: str | Path | None,
                           calibration_dir: Path | None = None) -> Path:
    """NNCF post-training int8 (weights and activations) on a calibration set.

    Without VNNI, weights are kept to 7 bits in every layer (NNCF's overflow
    fix) so the u8 x s8 kernels cannot saturate; with VNNI only the first.
    """
    source = convert_openvino(loaded, cache_dir)

    def build(tmp: Path) -> None:
        ov = require("openvino", "openvino")
        try:
            import nncf
        except ImportError:
            raise RuntimeUnavailableError(
                "OpenVINO int8 needs NNCF for post-training quantisation: pip install nncf "
                "(or use --runtime onnx --precision int8)"
            ) from None
        started = time.perf_counter()
        pixels = calibration_pixels(loaded, calibration_dir)
        dataset = nncf.Dataset([pixels[i : i + 1] for i in range(len(pixels))])
        model = ov.Core().read_model(str(source))
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            OverflowFix,
        )

        # Same saturation as ONNX Runtime's without VNNI: 7-bit weights in every layer.
        overflow = OverflowFix.ENABLE if weights == "s7" else OverflowFix.FIRST_LAYER
        quantized = nncf.quantize(
            model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(pixels),
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=overflow),
        )
        ov.save_model(quantized, str(tmp / "model.xml"), compress_to_fp16=False)
        _write_meta(tmp, loaded, "openvino", "int8", time.perf_counter() - started,
                    calibration=calibration_tag(calibration_dir), weight_type=weights)

    tag = calibration_tag(calibration_dir)
    weights = "s8" if cpu_has_vnni() else "s7"
    final = artifact_root(loaded, cache_dir) / f"openvino-int8-{tag}-{weights}"
    return build_atomically(final, build) / "model.xml"


def _write_meta(folder: Path, loaded: LoadedModel, runtime: str, precision: str,
                seconds: float, **extra) -> None:
    """``meta.json`` inside a folder still being built (the folder rename is the commit)."""
    import torch

    meta = {
        "model": loaded.spec,
        "fingerprint": loaded.fingerprint,
        "runtime": runtime,
        "precision": precision,
        "export_version": EXPORT_VERSION,
        "opset": ONNX_OPSET,
        "torch": torch.__version__,
        "build_seconds": round(seconds, 2),
        **extra,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2), "utf-8")
    log.info("built %s %s artifact in %.1f s", runtime, precision, seconds)
