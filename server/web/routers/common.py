"""What the routers share: the bridge, the key check, the body readers, the call.

A route reaches the servicer through ``Bridge``, found in ``app.state.bridge``
(the ``BridgeDep`` dependency). The routes that read a body declare
``authorized(method)``: FastAPI runs a route's dependencies before its
endpoint, and the endpoints read the body themselves from the ``Request`` (no
body parameter), so the API key and its role are checked before any byte of
the body is read, as the gRPC interceptor does. ``Bridge.call`` checks the key
again (for the routes without a body it is the check; a refusal there is
logged and counted like any call).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import grpc
from fastapi import Depends, Request
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse
from google.protobuf.message import Message
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.server.grpc.auth import bearer_token
from biolit_id.server.web.bridge import ApiError, Bridge
from biolit_id.server.web.protojson import from_fields, from_json, query_parameters, to_json

MAX_FORM_FILES = 100
MAX_FORM_FIELDS = 1000
BODY_TYPES = ("application/json", "multipart/form-data")


# ------------------------------------------------------------------ the bridge, the key


def bridge_of(request: Request) -> Bridge:
    """The bridge ``create_app`` put in ``app.state``."""
    return request.app.state.bridge


BridgeDep = Annotated[Bridge, Depends(bridge_of)]


def token(request: Request) -> str | None:
    """The key of ``Authorization: Bearer <key>``, or None."""
    return bearer_token(tuple(request.headers.items()))


def peer(request: Request) -> str:
    """The client as gRPC names a peer: ``ipv4:HOST:PORT``."""
    client = request.client
    if client is None:
        return "unknown"
    family = "ipv6" if ":" in client.host else "ipv4"
    return f"{family}:{client.host}:{client.port}"


def authorized(method: str) -> DependsParam:
    """A dependency that checks the key and its role for the gRPC ``method``.

    Refuses with 401/403 (``ApiError``) before the endpoint runs, so before its
    body is read; with no keys configured every call may run.
    """

    async def check(request: Request, bridge: BridgeDep) -> None:
        bridge.authorize(method, token(request))

    check.__name__ = f"authorize_{method}"
    return Depends(check)


async def run(request: Request, bridge: Bridge, method: str,
              message: Message | list[Message]) -> JSONResponse:
    """``method`` on the servicer, in the thread pool, its answer as proto3 JSON."""
    response = await run_in_threadpool(bridge.call, method, message, token(request),
                                       peer(request))
    return JSONResponse(to_json(response))


# ------------------------------------------------------------------ reading requests


async def fields(request: Request) -> list[tuple[str, str | bytes]]:
    """Form fields (file parts as bytes) or query parameters, in order."""
    if request.method in ("GET", "DELETE", "HEAD"):
        return list(request.query_params.multi_items())
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"send {' or '.join(BODY_TYPES)}, not {kind or 'no Content-Type'}",
                       http_status=415)
    form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    items: list[tuple[str, str | bytes]] = []
    for name, value in form.multi_items():
        items.append((name, await value.read() if isinstance(value, UploadFile) else value))
    return items


async def json_body(request: Request) -> Any | None:
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
    """``message_cls`` from a JSON body, a form or the query; ``fixed`` fields set over it."""
    body = await json_body(request)
    if body is not None:
        message = from_json(body, message_cls)
        for name, value in (fixed or {}).items():
            setattr(message, name, value)
        return message
    return from_fields(await fields(request), message_cls, fixed)


# ------------------------------------------------------------------ OpenAPI


def schema_ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def doc(request_cls: type[Message] | None, response_cls: type[Message], *,
        body: str | None = None, query: bool = False,
        skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """OpenAPI for one route: its request (JSON and/or form, or query) and responses."""
    extra: dict[str, Any] = {}
    if request_cls is not None and query:
        extra["parameters"] = query_parameters(request_cls.DESCRIPTOR, skip)
    if request_cls is not None and body is not None:
        content: dict[str, Any] = {
            "application/json": {"schema": schema_ref(body)},
            "multipart/form-data": {"schema": {
                "type": "object",
                "description": f"the fields of {request_cls.DESCRIPTOR.name}; "
                               "the photo as a file part named 'image'",
            }},
        }
        extra["requestBody"] = {"required": True, "content": content}
    errors = {str(s): {"description": c,
                       "content": {"application/json": {"schema": schema_ref("Error")}}}
              for s, c in ((400, "INVALID_ARGUMENT"), (401, "UNAUTHENTICATED"),
                           (403, "PERMISSION_DENIED"), (404, "NOT_FOUND"))}
    responses = {"200": {"description": response_cls.DESCRIPTOR.name, "content": {
        "application/json": {"schema": schema_ref(response_cls.DESCRIPTOR.name)}}}, **errors}
    return {"openapi_extra": extra, "responses": responses}
