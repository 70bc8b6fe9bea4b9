"""What a device needs to identify on its own, as files with digests (``GET /v1/models``).

* ``image_tower``: the model's image tower as ONNX, the very file ``--runtime onnx``
  exports (``inference.embedders.export``), fp32, and int8 (u8 weights, dynamic
  quantisation) when it passes the fidelity gate against eager torch fp32;
* ``decision``: the service's decision over its live prototypes as an ONNX graph
  (``decision_graph``), rebuilt when the gallery's prototypes change;
* ``preprocessing``: the pixel recipe (size, mean, std, resize rule) as JSON.

Every artifact has a content-addressed URL (``/v1/models/<name>/<sha16>.<ext>``),
so it can be cached for ever; the listing itself is revalidated. ``fingerprint``
digests the whole listing: a service worker keyed on it drops what an update of
the bundle, the model or the gallery made stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from biolit_id.index.core.atomic import atomic_write
from biolit_id.index.core.digest import file_sha256
from biolit_id.server.device.tower_export import export_in_child

log = logging.getLogger(__name__)

FORMAT = "biolit-id-device/1"
# The page downsizes every photo to this short side before it uploads or embeds it.
UPLOAD_SHORT_SIDE = 448
DEVICE_INT8_WEIGHTS = "u8"  # u8 x u8 never saturates on CPUs without VNNI (phones, WASM)


@dataclass(frozen=True)
class Artifact:
    name: str  # image_tower, decision, preprocessing
    variant: str  # fp32, int8, onnx, json
    path: Path
    sha256: str
    size: int
    media_type: str
    metadata: dict | None = None  # the decision graph's metadata (species, ranks, taxa)

    @property
    def url(self) -> str:
        ext = "json" if self.media_type == "application/json" else "onnx"
        return f"/v1/models/{self.name}/{self.variant}-{self.sha256[:16]}.{ext}"

    def listing(self) -> dict:
        return {"name": self.name, "variant": self.variant, "url": self.url,
                "bytes": self.size, "sha256": self.sha256, "media_type": self.media_type,
                **({"metadata": self.metadata} if self.metadata else {})}


def preprocessing_spec(model) -> dict:
    """The server's pixel recipe (``inference.preprocess``) for a photo the page sends."""
    return {
        "size": int(model.image_size),
        "mean": [float(v) for v in model.mean],
        "std": [float(v) for v in model.std],
        "resize": "squash",  # to size x size, aspect ratio not kept (the seed's)
        "filter": "pillow-bilinear",  # PIL's Image.BILINEAR (antialiased, 8-bit fixed point)
        "orientation": "exif",
        "layout": "NCHW float32, RGB, (x / 255 - mean) / std",
        "upload_short_side": UPLOAD_SHORT_SIDE,
        "embedding": "the image tower's output, L2-normalised",
    }


class DeviceArtifacts:
    """Builds the artifacts of one running service once, and the decision again when the
    prototypes change. Thread-safe; every file lives under ``<data_dir>/device/``."""

    def __init__(self, state) -> None:
        self.state = state
        self.folder = Path(state.config.data_dir) / "device"
        self._lock = threading.Lock()
        self._towers: list[Artifact] | None = None
        self._gates: dict[str, dict] = {}
        self._decision: tuple[object, Artifact] | None = None  # (prototype set, artifact)
        self._by_url: dict[str, Artifact] = {}

    # ------------------------------------------------------------ building

    def _file(self, name: str, variant: str, path: Path, media_type: str) -> Artifact:
        return Artifact(name, variant, path, file_sha256(path), path.stat().st_size, media_type)

    def _image_towers(self) -> list[Artifact]:
        if self._towers is not None:
            return self._towers
        from biolit_id.server.inference.embedders.export import export_onnx, quantize_onnx_int8

        model, data_dir = self.state.model, self.state.config.data_dir
        export_in_child(model.spec, Path(data_dir))  # the cache then has it: no trace here
        towers = [self._file("image_tower", "fp32", export_onnx(model, data_dir),
                             "application/octet-stream")]
        try:
            int8 = quantize_onnx_int8(model, data_dir, DEVICE_INT8_WEIGHTS)
            gate = self._gate(int8)
            self._gates["int8"] = gate
            if gate["passed"]:
                towers.append(self._file("image_tower", "int8", int8,
                                         "application/octet-stream"))
            else:
                log.warning("device int8 image tower fails the fidelity gate (min cosine "
                            "%.5f): only fp32 is offered", gate["cosine_min"])
        except Exception as exc:  # int8 is an option, never a reason to offer nothing
            log.warning("no int8 image tower for devices: %s", exc)
        self._towers = towers
        return towers

    def _gate(self, path: Path) -> dict:
        """The fidelity gate (``embedders.gate``) of the device's int8 file, cached beside it."""
        from biolit_id.server.inference.embedders.gate import GATE_COSINE, fidelity
        from biolit_id.server.inference.embedders.onnx import OnnxEmbedder

        record = self.folder / f"gate-int8-{file_sha256(path)[:16]}.json"
        if record.is_file():
            return json.loads(record.read_text("utf-8"))
        from biolit_id.server.inference.embedders.calibration import calibration_pixels
        from biolit_id.server.inference.embedders.gate import embed_batched, reference_embeddings

        model = self.state.model
        pixels = calibration_pixels(model, self.state.config.calibration_dir)
        embedder = OnnxEmbedder(path, "int8", model.embedding_dim)
        result = asdict(fidelity(reference_embeddings(model, pixels),
                                 embed_batched(embedder, pixels), "onnx", "int8", GATE_COSINE))
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(record, json.dumps(result, indent=2))
        return result

    def _decision_artifact(self) -> Artifact:
        from biolit_id.server.device.decision_graph import export_decision, metadata_of

        protos = self.state.identifier.prototypes()
        cached = self._decision
        if cached is not None and cached[0] is protos:
            return cached[1]
        model = export_decision(self.state.scorer, protos, self.state.catalog, {
            "model_fingerprint": self.state.model.fingerprint,
            "model_id": self.state.model.spec})
        data = model.SerializeToString()
        path, digest = self._stored("decision", "onnx", data)
        meta = metadata_of(model)
        keep = ("species", "ranks", "taxa", "rank_thresholds", "methods", "routing", "mode")
        artifact = Artifact("decision", "onnx", path, digest, len(data),
                            "application/octet-stream", {k: meta[k] for k in keep})
        self._decision = (protos, artifact)
        return artifact

    def _preprocessing(self) -> Artifact:
        data = json.dumps(preprocessing_spec(self.state.model), indent=1,
                          sort_keys=True).encode("utf-8")
        path, digest = self._stored("preprocessing", "json", data)
        return Artifact("preprocessing", "json", path, digest, len(data), "application/json")

    def _stored(self, name: str, ext: str, data: bytes) -> tuple[Path, str]:
        """``data`` at its content-addressed path under the folder (written once); the
        path and its SHA-256."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.folder / f"{name}-{digest[:16]}.{ext}"
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        return path, digest

    # ------------------------------------------------------------ what the router asks

    def listing(self) -> dict:
        """``GET /v1/models``: every artifact with its URL, size, digest; one fingerprint."""
        with self._lock:
            artifacts = _at_low_priority(lambda: [*self._image_towers(),
                                                  self._decision_artifact(),
                                                  self._preprocessing()])
            for a in artifacts:
                self._by_url[a.url] = a
        state = self.state
        body = {
            "format": FORMAT,
            "model_id": state.model.spec,
            "model_fingerprint": state.model.fingerprint,
            "embedding_dim": state.model.embedding_dim,
            "bundle_id": state.bundle.bundle_id if state.bundle else "",
            "routing": state.bundle.routing if state.bundle else "zero-shot",
            "prototype_version": int(getattr(state.identifier.prototypes(), "version", 0)),
            "preprocessing": preprocessing_spec(state.model),
            "artifacts": [a.listing() for a in artifacts],
            "gates": self._gates,
        }
        body["fingerprint"] = hashlib.sha256(json.dumps(
            [state.model.fingerprint, body["bundle_id"],
             [a.sha256 for a in artifacts]]).encode()).hexdigest()[:16]
        return body

    def find(self, url: str) -> Artifact | None:
        """The artifact a listing offered at ``url`` (older decisions stay fetchable)."""
        found = self._by_url.get(url)
        if found is None and not self._by_url:
            self.listing()
            found = self._by_url.get(url)
        return found


def _at_low_priority(build):
    """``build()`` in a thread of its own at the lowest CPU priority (Linux ``nice 19``):
    the first export of the image tower takes seconds of CPU, and identifications must
    not wait behind it."""
    out: dict = {}

    def target() -> None:
        with contextlib.suppress(OSError, AttributeError):  # elsewhere: normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            out["value"] = build()
        except BaseException as exc:  # re-raised in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=target, name="device-artifacts", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
