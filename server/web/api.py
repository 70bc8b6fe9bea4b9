"""The HTTP app: JSON API under /v1/, the page at /, OpenAPI at /openapi.json.

Every /v1/ route is one gRPC method: it turns the HTTP request into that
method's request message (``protojson``) and runs the servicer in-process
(``bridge``). Blocking work runs in Starlette's thread pool, like a gRPC
worker thread. Swagger UI is not served: it loads from a CDN, and these
machines have no internet.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from google.protobuf.message import Message
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.grpc.auth import bearer_token
from biolit_id.server.web.bridge import HTTP_STATUS, ApiError, Bridge
from biolit_id.server.web.guard import BodyTooLargeError
from biolit_id.server.web.protojson import (
    from_fields,
    from_json,
    json_schemas,
    query_parameters,
    to_json,
)
from biolit_id.server.wiring import SERVICE_VERSION

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_FORM_FILES = 100
MAX_FORM_FIELDS = 1000
_CODE_FOR_HTTP = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED",
                  401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}
_BODY_TYPES = ("application/json", "multipart/form-data")


def _peer(request: Request) -> str:
    client = request.client
    if client is None:
        return "unknown"
    family = "ipv6" if ":" in client.host else "ipv4"
    return f"{family}:{client.host}:{client.port}"


async def _fields(request: Request) -> list[tuple[str, str | bytes]]:
    """Form fields (file parts as bytes) or query parameters, in order."""
    if request.method in ("GET", "DELETE", "HEAD"):
        return list(request.query_params.multi_items())
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"send {' or '.join(_BODY_TYPES)}, not {kind or 'no Content-Type'}",
                       http_status=415)
    form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    items: list[tuple[str, str | bytes]] = []
    for name, value in form.multi_items():
        items.append((name, await value.read() if isinstance(value, UploadFile) else value))
    return items


async def _json_body(request: Request) -> Any | None:
    """The parsed JSON body, or None when the request is not JSON."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method not in ("POST", "PUT", "PATCH") or kind != "application/json":
        return None
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the body is not valid JSON: {exc}") from None


async def read_message(request: Request, message_cls: type[Message],
                       fixed: dict[str, Any] | None = None) -> Message:
    body = await _json_body(request)
    if body is not None:
        message = from_json(body, message_cls)
        for name, value in (fixed or {}).items():
            setattr(message, name, value)
        return message
    return from_fields(await _fields(request), message_cls, fixed)


async def read_exemplars(request: Request) -> list[pb.AddExemplarRequest]:
    """JSON ``{"exemplars": [AddExemplarRequest...]}``, or a form: one message per
    ``image`` part, the other fields (species, licence...) shared by all."""
    body = await _json_body(request)
    if body is not None:
        if not isinstance(body, dict) or set(body) != {"exemplars"} or \
                not isinstance(body["exemplars"], list):
            raise InvalidRequestError('the JSON body must be {"exemplars": [AddExemplarRequest, '
                                      "...]}")
        return [from_json(item, pb.AddExemplarRequest) for item in body["exemplars"]]
    items = await _fields(request)
    images = [value for name, value in items if name == "image"]
    shared = [(name, value) for name, value in items if name != "image"]
    base = from_fields(shared, pb.AddExemplarRequest)
    if not images:
        return [base]  # the servicer says what is missing
    out = []
    for image in images:
        item = pb.AddExemplarRequest()
        item.CopyFrom(base)
        item.image = image if isinstance(image, bytes) else image.encode()
        out.append(item)
    return out


async def read_observation(request: Request) -> pb.IdentifyObservationRequest:
    """JSON (an IdentifyObservationRequest), or a form: one photo per ``image`` part,
    ``latitude``/``longitude``/``uncertainty_m`` for the place, the other fields as named."""
    body = await _json_body(request)
    if body is not None:
        return from_json(body, pb.IdentifyObservationRequest)
    items = await _fields(request)
    place = {name: value for name, value in items if name in _PLACE}
    rest = [(n, v) for n, v in items if n != "image" and n not in _PLACE]
    message = from_fields(rest, pb.IdentifyObservationRequest)
    for name, value in items:
        if name == "image":
            message.photos.add(image=value if isinstance(value, bytes) else value.encode())
    if place:
        message.location.CopyFrom(from_fields(list(place.items()), pb.Location))
    return message


_PLACE = ("latitude", "longitude", "uncertainty_m", "uncertaintyM")
# What a POST route's body becomes: a message class, or a reader for a form of its own.
BodyReader = type[Message] | Callable[[Request], Awaitable[Message | list[Message]]]


def _schema_ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _doc(request_cls: type[Message] | None, response_cls: type[Message], *,
         body: str | None = None, query: bool = False,
         skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """OpenAPI for one route: its request (JSON and/or form, or query) and responses."""
    extra: dict[str, Any] = {}
    if request_cls is not None and query:
        extra["parameters"] = query_parameters(request_cls.DESCRIPTOR, skip)
    if request_cls is not None and body is not None:
        content: dict[str, Any] = {
            "application/json": {"schema": _schema_ref(body)},
            "multipart/form-data": {"schema": {
                "type": "object",
                "description": f"the fields of {request_cls.DESCRIPTOR.name}; "
                               "the photo as a file part named 'image'",
            }},
        }
        extra["requestBody"] = {"required": True, "content": content}
    errors = {str(s): {"description": c,
                       "content": {"application/json": {"schema": _schema_ref("Error")}}}
              for s, c in ((400, "INVALID_ARGUMENT"), (401, "UNAUTHENTICATED"),
                           (403, "PERMISSION_DENIED"), (404, "NOT_FOUND"))}
    responses = {"200": {"description": response_cls.DESCRIPTOR.name, "content": {
        "application/json": {"schema": _schema_ref(response_cls.DESCRIPTOR.name)}}}, **errors}
    return {"openapi_extra": extra, "responses": responses}


def create_app(bridge: Bridge) -> FastAPI:
    app = FastAPI(title="biolit-id", version=SERVICE_VERSION, docs_url=None, redoc_url=None,
                  description="Species identification for BioLit photos: the gRPC service "
                              "biolit.v1.SpeciesIdentifier as JSON (proto3 JSON mapping).")

    async def run(request: Request, method: str, message: Message | list[Message]):
        response = await run_in_threadpool(
            bridge.call, method, message, _token(request), _peer(request))
        return JSONResponse(to_json(response))

    async def run_body(request: Request, method: str, body: BodyReader) -> JSONResponse:
        """Keys before any byte of the body is read, as the gRPC interceptor does.

        ``body`` is the request message's class (read by ``read_message``) or a
        reader of its own for the routes whose form differs.
        """
        bridge.authorize(method, _token(request))
        message = (await read_message(request, body) if isinstance(body, type)
                   else await body(request))
        return await run(request, method, message)

    @app.post("/v1/identify", summary="Identify one photo (Identify)", tags=["identify"],
              **_doc(pb.IdentifyRequest, pb.IdentifyResponse, body="IdentifyRequest"))
    async def identify(request: Request):
        return await run_body(request, "Identify", pb.IdentifyRequest)

    @app.post("/v1/identify-observation", tags=["identify"],
              summary="Several photos of one find, with place and date (IdentifyObservation)",
              **_doc(pb.IdentifyObservationRequest, pb.IdentifyObservationResponse,
                     body="IdentifyObservationRequest"))
    async def identify_observation(request: Request):
        return await run_body(request, "IdentifyObservation", read_observation)

    @app.post("/v1/similar", summary="Nearest reference photos (SearchSimilar)",
              tags=["gallery"],
              **_doc(pb.SearchSimilarRequest, pb.SearchSimilarResponse,
                     body="SearchSimilarRequest"))
    async def similar(request: Request):
        return await run_body(request, "SearchSimilar", pb.SearchSimilarRequest)

    @app.get("/v1/info", summary="Model, limits and versions (GetServiceInfo)", tags=["catalog"],
             **_doc(None, pb.ServiceInfo))
    async def info(request: Request):
        return await run(request, "GetServiceInfo", pb.GetServiceInfoRequest())

    @app.get("/v1/species", summary="Every species (ListSpecies)", tags=["catalog"],
             **_doc(pb.ListSpeciesRequest, pb.ListSpeciesResponse, query=True))
    async def list_species(request: Request):
        return await run(request, "ListSpecies",
                         await read_message(request, pb.ListSpeciesRequest))

    @app.post("/v1/species", summary="Add a species (AddSpecies, role curate)",
              tags=["curation"],
              **_doc(pb.AddSpeciesRequest, pb.Species, body="AddSpeciesRequest"))
    async def add_species(request: Request):
        return await run_body(request, "AddSpecies", pb.AddSpeciesRequest)

    @app.get("/v1/species/{scientific_name:path}", summary="One species (GetSpecies)",
             tags=["catalog"], **_doc(None, pb.Species))
    async def get_species(request: Request, scientific_name: str):
        return await run(request, "GetSpecies",
                         pb.GetSpeciesRequest(scientific_name=scientific_name))

    @app.get("/v1/exemplars", summary="Reference photos, paged (ListExemplars)",
             tags=["gallery"],
             **_doc(pb.ListExemplarsRequest, pb.ListExemplarsResponse, query=True))
    async def list_exemplars(request: Request):
        return await run(request, "ListExemplars",
                         await read_message(request, pb.ListExemplarsRequest))

    @app.post("/v1/exemplars", summary="Add reference photos (AddExemplars, role curate)",
              tags=["curation"],
              **_doc(pb.AddExemplarRequest, pb.AddExemplarsResponse, body="AddExemplarsBody"))
    async def add_exemplars(request: Request):
        return await run_body(request, "AddExemplars", read_exemplars)

    @app.post("/v1/exemplars:remove", summary="Remove reference photos (RemoveExemplars)",
              tags=["curation"],
              **_doc(pb.RemoveExemplarsRequest, pb.RemoveExemplarsResponse,
                     body="RemoveExemplarsRequest"))
    async def remove_exemplars(request: Request):
        return await run_body(request, "RemoveExemplars", pb.RemoveExemplarsRequest)

    @app.delete("/v1/exemplars/{exemplar_id}", summary="Remove one reference photo",
                tags=["curation"], **_doc(None, pb.RemoveExemplarsResponse))
    async def remove_exemplar(request: Request, exemplar_id: int):
        return await run(request, "RemoveExemplars",
                         pb.RemoveExemplarsRequest(exemplar_ids=[exemplar_id]))

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


def _token(request: Request) -> str | None:
    return bearer_token(tuple(request.headers.items()))


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
                                                  "items": _schema_ref("AddExemplarRequest")}}}
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
