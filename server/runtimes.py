"""Exported runtimes (ONNX Runtime, OpenVINO) behind the ``Embedder`` interface.

Eager fp32 PyTorch is the reference, but on a 2-core CPU it is also the
slowest way to run the image tower. The model is exported once to ONNX from
the loaded open_clip module (``torch.onnx.export(dynamo=True)``, opset 18,
dynamic batch axis) and cached in the data dir, keyed by the model's
fingerprint, the runtime and the precision, so a restart only loads files:

    <data_dir>/runtimes/<fingerprint>-v<EXPORT_VERSION>/
        onnx-fp32/model.onnx        exported graph (also the input of the others)
        onnx-int8/model.onnx        onnxruntime dynamic quantisation (QInt8 weights)
        openvino-fp32/model.xml     ov.convert_model of the ONNX file; runs fp32 or
                                    bf16 (a compile-time hint, not a different file)
        openvino-int8-<calib>/...   NNCF post-training quantisation on a calibration set
        gate-<runtime>-<precision>.json   fidelity gate result (see ``fidelity_gate``)

OpenVINO converts the ONNX file because converting the torch module directly
failed for open_clip's ViT. OpenVINO silently runs bf16 on CPUs that have it,
so the precision hint is always set explicitly (f32 when fp32 is asked).

Every artifact is built in a temporary folder and renamed into place, so two
processes starting at once never read a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from biolit_id.core.vectors import l2_normalize
from biolit_id.server.embedder import PRECISIONS, RUNTIMES, Embedder, make_embedder
from biolit_id.server.model_loader import LoadedModel

log = logging.getLogger(__name__)

EXPORT_VERSION = 1
ONNX_OPSET = 18
GATE_COSINE = 0.999
# The runtimes `auto` considers (ties go to the earlier one). Which is fastest
# depends on the CPU (bf16 units, AMX) and is measured on the machine itself at
# the first start (see resolve_auto). int8 is never chosen implicitly: its gate
# must be checked on the real model and real photos (`biolit-id check-runtime`).
AUTO_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("openvino", "int8"),  # only with an explicit --precision int8
    ("onnx", "int8"),  # idem
    ("openvino", "bf16"),
    ("openvino", "fp32"),
    ("onnx", "fp32"),
    ("torch", "bf16"),
    ("torch", "fp32"),
)
CALIBRATION_IMAGES = 16

_export_lock = threading.Lock()
_model_threads = 0  # 0 = one per available core; set by configure_threads()


class RuntimeUnavailableError(RuntimeError):
    """A runtime/precision cannot run here; the message says what to install or pick."""


# ------------------------------------------------------------------ threads


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int) -> int:
    return threads if threads > 0 else available_cores()


def configure_threads(model_threads: int = 0, search_threads: int = 0) -> dict[str, int]:
    """Set the kernel thread pools once, deliberately, for a small CPU.

    One model forward at a time uses every core (the micro-batcher makes the
    batches big instead of running several models side by side), and FAISS
    gets its own count because searches run in gRPC threads concurrently with
    the model. Returns what was set, for logs and the benchmark.
    """
    global _model_threads
    _model_threads = resolve_threads(model_threads)
    search = resolve_threads(search_threads)
    import torch

    torch.set_num_threads(_model_threads)
    try:
        import faiss

        faiss.omp_set_num_threads(search)
    except ImportError:  # faiss is a base dependency; tolerate odd installs
        pass
    return {"model_threads": _model_threads, "search_threads": search}


def model_threads() -> int:
    return _model_threads or available_cores()


# ------------------------------------------------------------ calibration


def synthetic_photos(count: int, size: tuple[int, int] = (640, 480), seed: int = 0,
                     quality: int = 90) -> list[bytes]:
    """Deterministic photo-like JPEGs: gradients, shapes, edges and sensor noise.

    Offline there are no real photos to calibrate with; these exercise the
    same value ranges and spatial frequencies a ViT sees. A deployment should
    pass real photos (``--calibration-dir``) where the choice matters (int8).
    """
    import io

    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(count):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
        base = rng.uniform(30, 220, size=3).astype(np.float32)
        grad = rng.uniform(-120, 120, size=(2, 3)).astype(np.float32)
        arr = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 12))):
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            rx, ry = rng.uniform(0.03, 0.3) * w, rng.uniform(0.03, 0.3) * h
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            box = (x0 - rx, y0 - ry, x0 + rx, y0 + ry)
            if rng.random() < 0.5:
                draw.ellipse(box, fill=colour)
            else:
                draw.rectangle(box, fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
        noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, size=(h, w, 3)).astype(np.int16)
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def image_files(folder: Path, limit: int | None = None) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit] if limit else files


def calibration_pixels(loaded: LoadedModel, folder: Path | None = None,
                       count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """[N, 3, H, W] model inputs: photos from ``folder``, else synthetic ones."""
    from biolit_id.server.preprocess import ImageDecodeError, ImagePolicy, preprocess

    policy = ImagePolicy(image_size=loaded.image_size, mean=loaded.mean, std=loaded.std)
    if folder is None:
        photos = synthetic_photos(count)
    else:
        photos = [p.read_bytes() for p in image_files(folder, count)]
        if not photos:
            raise RuntimeUnavailableError(f"no photos in calibration folder {folder}")
    arrays = []
    for data in photos:
        try:
            arrays.append(preprocess(data, policy))
        except ImageDecodeError as exc:
            log.warning("calibration: skipping unreadable photo: %s", exc)
    return np.stack(arrays)


def calibration_tag(folder: Path | None) -> str:
    """Short identity of a calibration set, part of an int8 artifact's cache key."""
    if folder is None:
        return f"synthetic{CALIBRATION_IMAGES}"
    digest = hashlib.sha256()
    for path in image_files(folder, CALIBRATION_IMAGES):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return "photos-" + digest.hexdigest()[:10]


# ------------------------------------------------------------------ export


def artifact_root(loaded: LoadedModel, cache_dir: str | Path | None) -> Path:
    base = Path(cache_dir) if cache_dir else Path("./data")
    return base / "runtimes" / f"{loaded.fingerprint}-v{EXPORT_VERSION}"


def _build_atomically(final: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and rename the folder into place; reuse what exists."""
    if final.is_dir():
        return final
    with _export_lock:
        if final.is_dir():
            return final
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            try:
                tmp.rename(final)
            except OSError:  # another process won the race; its copy is as good
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


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


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeUnavailableError(
            f"{module} is not installed; install it with: pip install 'biolit-id[{extra}]'"
        ) from None


def export_onnx(loaded: LoadedModel, cache_dir: str | Path | None) -> Path:
    """The fp32 ONNX graph of the image tower (dynamic batch), exported once."""

    def build(tmp: Path) -> None:
        import torch

        _require("onnx", "onnx")
        _require("onnxscript", "onnx")
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

    return _build_atomically(artifact_root(loaded, cache_dir) / "onnx-fp32", build) / "model.onnx"


def quantize_onnx_int8(loaded: LoadedModel, cache_dir: str | Path | None) -> Path:
    """Dynamic int8 (QInt8 weights, activations quantised on the fly): no calibration."""
    source = export_onnx(loaded, cache_dir)

    def build(tmp: Path) -> None:
        _require("onnxruntime", "onnx")
        from onnxruntime.quantization import QuantType, quantize_dynamic

        started = time.perf_counter()
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))  # the quantiser logs every tensor at INFO
        try:
            quantize_dynamic(str(source), str(tmp / "model.onnx"), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        _write_meta(tmp, loaded, "onnx", "int8", time.perf_counter() - started)

    final = artifact_root(loaded, cache_dir) / "onnx-int8"
    return _build_atomically(final, build) / "model.onnx"


def convert_openvino(loaded: LoadedModel, cache_dir: str | Path | None) -> Path:
    """OpenVINO IR converted from the ONNX export (weights kept in fp32)."""
    source = export_onnx(loaded, cache_dir)

    def build(tmp: Path) -> None:
        ov = _require("openvino", "openvino")
        started = time.perf_counter()
        model = ov.convert_model(str(source))
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        _write_meta(tmp, loaded, "openvino", "fp32", time.perf_counter() - started)

    final = artifact_root(loaded, cache_dir) / "openvino-fp32"
    return _build_atomically(final, build) / "model.xml"


def quantize_openvino_int8(loaded: LoadedModel, cache_dir: str | Path | None,
                           calibration_dir: Path | None = None) -> Path:
    """NNCF post-training int8 (weights and activations) on a calibration set."""
    source = convert_openvino(loaded, cache_dir)

    def build(tmp: Path) -> None:
        ov = _require("openvino", "openvino")
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
        quantized = nncf.quantize(
            model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(pixels)
        )
        ov.save_model(quantized, str(tmp / "model.xml"), compress_to_fp16=False)
        _write_meta(tmp, loaded, "openvino", "int8", time.perf_counter() - started,
                    calibration=calibration_tag(calibration_dir))

    tag = calibration_tag(calibration_dir)
    final = artifact_root(loaded, cache_dir) / f"openvino-int8-{tag}"
    return _build_atomically(final, build) / "model.xml"


def _write_meta(folder: Path, loaded: LoadedModel, runtime: str, precision: str,
                seconds: float, **extra) -> None:
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


# --------------------------------------------------------------- embedders


class OnnxEmbedder:
    """ONNX Runtime on CPU: fp32 (the plain export) or int8 (dynamic QInt8)."""

    runtime = "onnx"

    def __init__(self, path: Path, precision: str, embedding_dim: int,
                 threads: int | None = None) -> None:
        ort = _require("onnxruntime", "onnx")
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


class OpenVinoEmbedder:
    """OpenVINO on CPU with an explicit precision hint and thread count."""

    runtime = "openvino"

    def __init__(self, path: Path, precision: str, embedding_dim: int,
                 threads: int | None = None, compile_cache: Path | None = None) -> None:
        ov = _require("openvino", "openvino")
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
        _require("onnxruntime", "onnx")
        if precision == "bf16":
            raise RuntimeUnavailableError(
                "ONNX Runtime has no fast bf16 path on CPU; use --runtime openvino "
                "--precision bf16 (or torch bf16), or onnx with fp32/int8"
            )
        path = quantize_onnx_int8(loaded, cache_dir) if precision == "int8" else (
            export_onnx(loaded, cache_dir)
        )
        return OnnxEmbedder(path, precision, dim)
    if runtime == "openvino":
        _require("openvino", "openvino")
        if precision == "int8":
            path = quantize_openvino_int8(loaded, cache_dir, calibration_dir)
        else:
            path = convert_openvino(loaded, cache_dir)
        return OpenVinoEmbedder(path, precision, dim,
                                compile_cache=artifact_root(loaded, cache_dir) / "ov-cache")
    raise RuntimeUnavailableError(
        f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}"
    )


# ------------------------------------------------------------ fidelity gate


@dataclass
class Fidelity:
    runtime: str
    precision: str
    images: int
    cosine_min: float
    cosine_mean: float
    threshold: float
    passed: bool


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=1)


def fidelity(reference: np.ndarray, candidate: np.ndarray, runtime: str, precision: str,
             threshold: float = GATE_COSINE) -> Fidelity:
    """Every calibration embedding must be within ``threshold`` cosine of fp32."""
    cos = cosine_rows(reference, candidate)
    return Fidelity(runtime, precision, int(cos.size), float(cos.min()), float(cos.mean()),
                    threshold, bool(cos.min() >= threshold))


def embed_batched(embedder: Embedder, pixels: np.ndarray, batch_size: int = 8) -> np.ndarray:
    return np.concatenate(
        [embedder.embed(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    )


def fidelity_gate(loaded: LoadedModel, embedder: Embedder, cache_dir: str | Path | None,
                  calibration_dir: Path | None = None,
                  reference: np.ndarray | None = None,
                  threshold: float = GATE_COSINE) -> Fidelity:
    """The gate for one runtime/precision, cached next to its artifacts."""
    record = _gate_record(loaded, embedder, cache_dir, calibration_dir)
    if record.is_file():
        data = json.loads(record.read_text("utf-8"))
        if data.get("threshold") == threshold:
            return Fidelity(**data)
    pixels = calibration_pixels(loaded, calibration_dir)
    if reference is None:
        reference = embed_batched(make_embedder(loaded, "torch", "fp32"), pixels)
    result = fidelity(reference, embed_batched(embedder, pixels),
                      embedder.runtime, embedder.precision, threshold)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(result), indent=2), "utf-8")
    os.replace(tmp, record)
    return result


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX); without them bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class AutoChoice:
    """What ``auto`` picked and why: gates and measured speed of every candidate."""

    runtime: str
    precision: str
    gates: list[Fidelity]
    ms_per_photo: dict[str, float]  # "runtime precision" -> batched forward, this machine
    reused: bool = False  # read from the data dir's record instead of measured now


def cpu_identity() -> str:
    """CPU model and usable cores: a speed ranking measured elsewhere does not apply here."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or 'unknown cpu'} x{available_cores()}"


def _eligible(runtime: str, precision: str,
              candidates: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for cand_runtime, cand_precision in candidates:
        if runtime not in ("auto", cand_runtime) or precision not in ("auto", cand_precision):
            continue
        if cand_precision == "int8" and precision != "int8":
            continue  # never chosen implicitly: its gate needs the real model and photos
        if cand_precision == "bf16" and not cpu_has_bf16():
            log.info("auto: skipping %s bf16 (no native bf16 on this CPU)", cand_runtime)
            continue
        out.append((cand_runtime, cand_precision))
    return out


def time_forward(embedders: Sequence[Embedder], pixels: np.ndarray, rounds: int = 3
                 ) -> list[float]:
    """Median ms per photo of each embedder on ``pixels``, measured interleaved.

    Rounds alternate between candidates so that a load spike from another
    process on a shared machine hits all of them, not just one.
    """
    for embedder in embedders:  # warm-up: first calls allocate and compile
        embedder.embed(pixels)
    samples: list[list[float]] = [[] for _ in embedders]
    for _ in range(rounds):
        for i, embedder in enumerate(embedders):
            started = time.perf_counter()
            embedder.embed(pixels)
            samples[i].append((time.perf_counter() - started) * 1e3 / len(pixels))
    return [float(np.median(s)) for s in samples]


def resolve_auto(loaded: LoadedModel, runtime: str, precision: str,
                 cache_dir: str | Path | None, calibration_dir: Path | None = None,
                 candidates: Sequence[tuple[str, str]] = AUTO_CANDIDATES,
                 threshold: float = GATE_COSINE, batch: int = 8,
                 ) -> tuple[Embedder, AutoChoice]:
    """The fastest runtime/precision that passes the fidelity gate on this machine.

    ``auto`` in either field leaves that field free. Candidates needing a
    missing package or CPU feature are skipped; the others are exported,
    gated against torch fp32 on the calibration set, and the passing ones
    timed (batched forward, interleaved rounds). The choice is recorded in
    the data dir with the CPU it was measured on, so only the first start
    on a machine pays for it (tens of seconds for ViT-B/16).
    """
    eligible = _eligible(runtime, precision, candidates)
    tag = calibration_tag(calibration_dir)
    record = artifact_root(loaded, cache_dir) / f"auto-{runtime}-{precision}-{tag}.json"
    cpu = cpu_identity()
    choice = _read_choice(record, cpu, threshold, eligible)
    if choice is not None:
        try:
            return make_embedder(loaded, choice.runtime, choice.precision,
                                 _cache(cache_dir)), choice
        except RuntimeUnavailableError as exc:  # a package went away since
            log.warning("auto: recorded choice unusable (%s); choosing again", exc)

    passing: list[tuple[Embedder, Fidelity | None]] = []
    gates: list[Fidelity] = []
    pixels = calibration_pixels(loaded, calibration_dir)
    reference = None
    for cand_runtime, cand_precision in eligible:
        try:
            embedder = make_embedder(loaded, cand_runtime, cand_precision, _cache(cache_dir))
        except RuntimeUnavailableError as exc:
            log.info("auto: skipping %s %s: %s", cand_runtime, cand_precision, exc)
            continue
        if (cand_runtime, cand_precision) == ("torch", "fp32"):
            passing.append((embedder, None))  # the reference itself
            continue
        if reference is None:
            reference = embed_batched(make_embedder(loaded, "torch", "fp32"), pixels)
        gate = fidelity_gate(loaded, embedder, cache_dir, calibration_dir, reference, threshold)
        gates.append(gate)
        if gate.passed:
            passing.append((embedder, gate))
        else:
            log.warning("auto: %s %s fails the fidelity gate (min cosine %.5f < %.4f)",
                        cand_runtime, cand_precision, gate.cosine_min, threshold)
    if not passing:
        if precision == "int8":
            raise RuntimeUnavailableError(
                "no int8 runtime is available here or none passes the fidelity gate; "
                "install biolit-id[openvino] or biolit-id[onnx], or use --precision auto"
            )
        fallback = ("torch" if runtime == "auto" else runtime,
                    "fp32" if precision == "auto" else precision)
        log.warning("auto: nothing passes the gate; using %s %s", *fallback)
        return make_embedder(loaded, *fallback, _cache(cache_dir)), AutoChoice(
            fallback[0], fallback[1], gates, {})
    sample = np.concatenate([pixels] * (batch // len(pixels) + 1))[:batch]
    timings = (time_forward([e for e, _ in passing], sample) if len(passing) > 1
               else [float("nan")])
    best = int(np.nanargmin(timings)) if len(passing) > 1 else 0
    chosen = passing[best][0]
    choice = AutoChoice(chosen.runtime, chosen.precision, gates,
                        {f"{e.runtime} {e.precision}": t
                         for (e, _), t in zip(passing, timings, strict=True)})
    _write_choice(record, choice, cpu, threshold, eligible)
    log.info("auto: %s %s is the fastest passing the fidelity gate here (%s)", chosen.runtime,
             chosen.precision, ", ".join(f"{k}: {v:.0f} ms/photo"
                                         for k, v in choice.ms_per_photo.items()))
    return chosen, choice


def _read_choice(record: Path, cpu: str, threshold: float,
                 eligible: list[tuple[str, str]]) -> AutoChoice | None:
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text("utf-8"))
        if (data["cpu"] != cpu or data["threshold"] != threshold
                or [tuple(c) for c in data["eligible"]] != eligible):
            return None
        return AutoChoice(data["runtime"], data["precision"],
                          [Fidelity(**g) for g in data["gates"]], data["ms_per_photo"],
                          reused=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_choice(record: Path, choice: AutoChoice, cpu: str, threshold: float,
                  eligible: list[tuple[str, str]]) -> None:
    data = {"runtime": choice.runtime, "precision": choice.precision, "cpu": cpu,
            "threshold": threshold, "eligible": eligible,
            "gates": [asdict(g) for g in choice.gates], "ms_per_photo": choice.ms_per_photo,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2), "utf-8")
    os.replace(tmp, record)


def _cache(cache_dir: str | Path | None) -> str | None:
    return str(cache_dir) if cache_dir is not None else None


def _gate_record(loaded: LoadedModel, embedder: Embedder, cache_dir,
                 calibration_dir: Path | None) -> Path:
    tag = calibration_tag(calibration_dir)
    return artifact_root(loaded, cache_dir) / (
        f"gate-{embedder.runtime}-{embedder.precision}-{tag}.json")


def build_embedder(loaded: LoadedModel, runtime: str, precision: str,
                   cache_dir: str | Path | None,
                   calibration_dir: Path | None = None) -> Embedder:
    """What the service calls: an explicit choice, or ``auto`` resolved by the gate."""
    if runtime not in ("auto", *RUNTIMES):
        raise RuntimeUnavailableError(
            f"unknown runtime {runtime!r}; choose auto or one of {', '.join(RUNTIMES)}")
    if precision not in ("auto", *PRECISIONS):
        raise RuntimeUnavailableError(
            f"unknown precision {precision!r}; choose auto or one of {', '.join(PRECISIONS)}")
    if runtime == "auto" or precision == "auto":
        embedder, _ = resolve_auto(loaded, runtime, precision, cache_dir, calibration_dir)
        return embedder
    if runtime == "torch" and precision == "int8":
        raise RuntimeUnavailableError(
            "the torch runtime has no int8 path; use --runtime onnx --precision int8 or "
            "--runtime openvino --precision int8 (and check it with biolit-id check-runtime)"
        )
    return make_embedder(loaded, runtime, precision, _cache(cache_dir))
