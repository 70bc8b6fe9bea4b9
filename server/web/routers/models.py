"""Model artifacts for identification on the device: ``GET /v1/models`` and the files it lists.

The listing (``server.device.artifacts``) names the image tower (fp32, int8
when its gate passes), the decision graph and the preprocessing spec, each at
a content-addressed URL: those answers carry a strong ETag (their SHA-256) and
``Cache-Control: public, max-age=31536000, immutable``; the listing is
``no-cache`` with its own ETag. ``/sw.js`` is the page's service worker, served
from the root so that it may control the page.
"""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from biolit_id.server.device.artifacts import DeviceArtifacts
from biolit_id.server.web.bridge import ApiError
from biolit_id.server.web.routers.common import BridgeDep, token

router = APIRouter()
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
IMMUTABLE = "public, max-age=31536000, immutable"
_lock = threading.Lock()


def artifacts_of(bridge) -> DeviceArtifacts:
    """One ``DeviceArtifacts`` per service, kept on the bridge."""
    with _lock:
        found = getattr(bridge, "device_artifacts", None)
        if found is None:
            found = DeviceArtifacts(bridge.servicer.state)
            bridge.device_artifacts = found
        return found


def _not_modified(request: Request, etag: str) -> bool:
    wanted = request.headers.get("if-none-match", "")
    return etag in [t.strip() for t in wanted.split(",")] or wanted.strip() == "*"


@router.get("/v1/models", summary="What a device needs to identify on its own", tags=["device"])
async def models(request: Request, bridge: BridgeDep):
    bridge.authorize("GetServiceInfo", token(request))
    try:
        body = await run_in_threadpool(artifacts_of(bridge).listing)
    except ImportError as exc:
        raise ApiError(*_unavailable(f"on-device artifacts need the onnx extra: {exc}")) from None
    etag = f'"{body["fingerprint"]}"'
    headers = {"etag": etag, "cache-control": "no-cache"}
    if _not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    return JSONResponse(body, headers=headers)


@router.get("/v1/models/{name}/{file}", summary="One artifact of the listing", tags=["device"])
async def artifact(request: Request, bridge: BridgeDep, name: str, file: str):
    bridge.authorize("GetServiceInfo", token(request))
    found = await run_in_threadpool(artifacts_of(bridge).find, f"/v1/models/{name}/{file}")
    if found is None:
        import grpc

        raise ApiError(grpc.StatusCode.NOT_FOUND,
                       f"no artifact /v1/models/{name}/{file}; GET /v1/models lists them")
    etag = f'"{found.sha256}"'
    headers = {"etag": etag, "cache-control": IMMUTABLE}
    if _not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    return FileResponse(found.path, media_type=found.media_type, headers=headers)


@router.get("/sw.js", include_in_schema=False)
async def service_worker() -> FileResponse:
    return FileResponse(STATIC_DIR / "sw.js", media_type="text/javascript",
                        headers={"cache-control": "no-cache", "service-worker-allowed": "/"})


def _unavailable(message: str):
    import grpc

    return grpc.StatusCode.UNAVAILABLE, message
