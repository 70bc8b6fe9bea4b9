"""Browser-facing defences around the HTTP app (one ASGI middleware).

* **Body cap**: a body longer than the gRPC message cap allows (with room
  for base64 in JSON) is refused with 413 before it is read to the end.
* **Loopback without keys stays loopback**: with no API keys on a loopback
  address, a ``Host`` header naming anything else is refused. A web page the
  user visits could otherwise reach the service through DNS rebinding.
* **No cross-origin writes**: a POST/DELETE whose ``Origin`` is not the page's
  own is refused, so another site cannot make the user's browser curate the
  gallery (the cookie-less CSRF that an open loopback service invites).
  No CORS headers are sent: other origins cannot read answers either.
* **Headers**: a Content-Security-Policy that allows only this service's own
  scripts, styles and images (plus ``data:``/``blob:`` photos) and the
  compilation of its WebAssembly, nosniff, no referrer, no framing, and
  cross-origin isolation (COOP/COEP), so that the on-device model's WASM
  runs threaded.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from biolit_id.server.grpc.auth import is_loopback

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECURITY_HEADERS = (
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data: blob:; script-src 'self' 'wasm-unsafe-eval'; "
     b"style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
     b"frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    # Cross-origin isolation: WebAssembly threads (the on-device model) need it.
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-embedder-policy", b"require-corp"),
)


class BodyTooLargeError(Exception):
    """The request body passed the cap while it was being read (413)."""


def body_cap(max_message_bytes: int) -> int:
    """Bytes a body may have: the message cap in base64 plus room for the other fields."""
    return max_message_bytes * 4 // 3 + 1024 * 1024


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


class WebGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int, loopback_only: bool) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, self._capped(receive), send_with_headers)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> JSONResponse | None:
        host = headers.get("host", "")
        if self.loopback_only and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            return _error(403, "PERMISSION_DENIED",
                          f"this server has no API keys and answers only on loopback "
                          f"names, not {host!r}")
        origin = headers.get("origin")
        cross_origin = origin is not None and urlsplit(origin).netloc.lower() != host.lower()
        if scope["method"] not in SAFE_METHODS and cross_origin:
            return _error(403, "PERMISSION_DENIED",
                          "cross-origin requests are refused; use the page this "
                          "server serves, or a client that sends no Origin")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return _error(413, "RESOURCE_EXHAUSTED",
                          f"request body is {length} bytes, at most {self.max_body_bytes} "
                          "allowed")
        return None

    def _capped(self, receive: Receive) -> Receive:
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLargeError(
                        f"request body is over {self.max_body_bytes} bytes")
            return message

        return capped
