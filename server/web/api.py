"""The HTTP app: JSON API under /v1/, the page at /, OpenAPI at /openapi.json.

Every /v1/ route is one gRPC method: it turns the HTTP request into that
method's request message (``protojson``) and runs the servicer in-process
(``bridge``). The routes are ``APIRouter``s in ``routers`` (identify, gallery,
catalog); they find the bridge in ``app.state.bridge``, and the routes with a
body check the API key in a dependency, before reading it. Blocking work runs
in Starlette's thread pool, like a gRPC worker thread. Here: the app, its error
handlers and its OpenAPI components. Swagger UI is not served: it loads from a
CDN, and these machines have no internet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.web.bridge import HTTP_STATUS, ApiError, Bridge
from biolit_id.server.web.guard import BodyTooLargeError
from biolit_id.server.web.protojson import json_schemas
from biolit_id.server.web.routers import ROUTERS
from biolit_id.server.web.routers.common import schema_ref
from biolit_id.server.wiring import SERVICE_VERSION

STATIC_DIR = Path(__file__).resolve().parent / "static"
_CODE_FOR_HTTP = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED",
                  401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}


def create_app(bridge: Bridge) -> FastAPI:
    app = FastAPI(title="biolit-id", version=SERVICE_VERSION, docs_url=None, redoc_url=None,
                  description="Species identification for BioLit photos: the gRPC service "
                              "biolit.v1.SpeciesIdentifier as JSON (proto3 JSON mapping).")
    app.state.bridge = bridge
    for router in ROUTERS:
        app.include_router(router)

    @app.get("/healthz", summary="Liveness", tags=["service"])
    async def healthz() -> dict[str, str]:
        return {"status": "SERVING"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _install_error_handlers(app)
    _install_schemas(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every failure is ``{"code", "message"}`` JSON, whatever raised it."""

    def reply(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse({"code": code, "message": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return reply(exc.http_status, exc.code.name, exc.message)

    @app.exception_handler(InvalidRequestError)
    async def invalid(_request: Request, exc: InvalidRequestError):
        return reply(400, "INVALID_ARGUMENT", str(exc))

    @app.exception_handler(BodyTooLargeError)
    async def too_large(_request: Request, exc: BodyTooLargeError):
        return reply(413, "RESOURCE_EXHAUSTED", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation(_request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
                 for e in exc.errors()]
        return reply(400, "INVALID_ARGUMENT", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        code = _CODE_FOR_HTTP.get(exc.status_code, "INVALID_ARGUMENT" if exc.status_code < 500
                                  else "INTERNAL")
        return reply(exc.status_code, code, str(exc.detail))


def _install_schemas(app: FastAPI) -> None:
    """Components generated from the proto descriptors, plus the error body."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            messages = [m for m in pb.DESCRIPTOR.message_types_by_name.values()]
            components = json_schemas(messages)
            components["Error"] = {"type": "object", "required": ["code", "message"],
                                   "properties": {
                                       "code": {"type": "string",
                                                "enum": [c.name for c in HTTP_STATUS]},
                                       "message": {"type": "string"}}}
            components["AddExemplarsBody"] = {"type": "object", "required": ["exemplars"],
                                              "properties": {"exemplars": {
                                                  "type": "array",
                                                  "items": schema_ref("AddExemplarRequest")}}}
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
