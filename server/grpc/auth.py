"""API keys and roles, checked by a server interceptor.

One check in front of every servicer, so no RPC can forget it: a method not
known to be read-only needs ``curate`` (deny by default). Keys are compared
by digest in constant time and never logged. Roles, codes and the key file:
docs/security.md.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

ROLE_IDENTIFY = "identify"
ROLE_CURATE = "curate"
# What each role may do; curate includes everything identify can.
ROLE_GRANTS: dict[str, frozenset[str]] = {
    ROLE_IDENTIFY: frozenset({ROLE_IDENTIFY}),
    ROLE_CURATE: frozenset({ROLE_IDENTIFY, ROLE_CURATE}),
}
MIN_KEY_LENGTH = 16

SERVICE = "biolit.v1.SpeciesIdentifier"
IDENTIFY_METHODS = frozenset({
    "Identify", "IdentifyStream", "IdentifyObservation", "SearchSimilar",
    "ListSpecies", "GetSpecies", "GetServiceInfo", "ListExemplars",
})
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})


class SecurityConfigError(ValueError):
    """The server's security settings are unsafe or inconsistent; it does not start."""


class ApiKeyFileError(SecurityConfigError):
    """The key file is unreadable or malformed; the message never quotes a key."""


class InsecureBindError(SecurityConfigError):
    """A non-loopback interface without API keys and without --insecure."""


def split_method(full_method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def required_role(full_method: str) -> str | None:
    """The role a method needs; None for open services.

    Anything not known to be read-only needs ``curate`` (deny by default), so
    an RPC added to the proto later is protected before anyone classifies it.
    """
    service, method = split_method(full_method)
    if service in OPEN_SERVICES:
        return None
    if service == SERVICE and method in IDENTIFY_METHODS:
        return ROLE_IDENTIFY
    return ROLE_CURATE


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """Digests of the configured keys with their roles (the keys themselves are not kept)."""

    entries: tuple[tuple[bytes, str], ...]

    def role_for(self, key: str) -> str | None:
        presented = _digest(key)
        found: str | None = None
        for digest, role in self.entries:
            # Every entry is compared, match or not, so timing says nothing.
            if hmac.compare_digest(presented, digest):
                found = role
        return found

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:  # never show digests either
        return f"ApiKeys({len(self.entries)} keys)"


def parse_api_keys(text: str, source: str = "<keys>") -> ApiKeys:
    entries: dict[bytes, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ApiKeyFileError(
                f"{source}:{lineno}: expected '<role> <key>' (2 fields), got {len(parts)}"
            )
        role, key = parts
        if role not in ROLE_GRANTS:
            raise ApiKeyFileError(
                f"{source}:{lineno}: unknown role {role!r} (expected one of "
                f"{', '.join(sorted(ROLE_GRANTS))})"
            )
        if len(key) < MIN_KEY_LENGTH:
            raise ApiKeyFileError(
                f"{source}:{lineno}: key is shorter than {MIN_KEY_LENGTH} characters"
            )
        digest = _digest(key)
        if digest in entries and entries[digest] != role:
            raise ApiKeyFileError(f"{source}:{lineno}: the same key is listed with two roles")
        entries[digest] = role
    if not entries:
        raise ApiKeyFileError(f"{source}: no keys (expected '<role> <key>' lines)")
    return ApiKeys(tuple(entries.items()))


def load_api_keys(path: Path) -> ApiKeys:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyFileError(f"cannot read API key file {path}: {exc}") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("API key file %s is readable by other users (chmod 600 it)", path)
    keys = parse_api_keys(text, str(path))
    counts = {role: sum(r == role for _, r in keys.entries) for role in ROLE_GRANTS}
    log.info("API keys loaded from %s: %s", path,
             ", ".join(f"{n} {role}" for role, n in counts.items()))
    return keys


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The key from ``authorization: Bearer <key>``, or None when absent or malformed."""
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


def _rejecting(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
               message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only fails the call.

    Same kind matters: a client-streaming method answered by a unary handler
    would misread the request stream.
    """

    def abort(_request, context: grpc.ServicerContext):
        context.abort(code, message)

    def abort_stream(_request, context: grpc.ServicerContext):
        context.abort(code, message)
        yield  # pragma: no cover - makes this a generator, never reached

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        refusal = refusal_for(self.keys, handler_call_details.method, token)
        if refusal is not None:
            return _rejecting(handler, *refusal)
        return handler


def refusal_for(keys: ApiKeys, full_method: str,
                token: str | None) -> tuple[grpc.StatusCode, str] | None:
    """Why ``token`` may not call ``full_method``, or None when it may.

    One decision for every transport: the gRPC interceptor and the HTTP API
    (``biolit_id.server.web``) both ask here.
    """
    needed = required_role(full_method)
    if needed is None:
        return None
    if token is None:
        return (grpc.StatusCode.UNAUTHENTICATED,
                "missing API key: send the header 'authorization: Bearer <key>'")
    role = keys.role_for(token)
    if role is None:
        return grpc.StatusCode.UNAUTHENTICATED, "unknown API key"
    if needed not in ROLE_GRANTS[role]:
        _, method = split_method(full_method)
        return (grpc.StatusCode.PERMISSION_DENIED,
                f"role {role!r} may not call {method} (needs role {needed!r})")
    return None


# ------------------------------------------------------------------ exposure


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname could resolve anywhere: treat as exposed


def check_exposure(host: str, has_keys: bool, insecure: bool) -> None:
    """Refuse to expose an unauthenticated service unless told to, and say what it does.

    Without keys anyone who can reach the port may curate the gallery, so the
    default is loopback only; ``--insecure`` is the explicit opt-out (for a
    private network or a sidecar proxy that authenticates).
    """
    if has_keys:
        return
    if is_loopback(host):
        log.warning("no --api-keys: binding loopback only (%s); every local process may "
                    "call every RPC, curation included", host)
        return
    if not insecure:
        raise InsecureBindError(
            f"refusing to bind {host!r} without --api-keys: anyone who can reach it could "
            "curate the gallery. Pass --api-keys FILE, bind 127.0.0.1, or pass --insecure "
            "to accept this."
        )
    log.warning("--insecure: serving %s WITHOUT authentication; every client may call "
                "every RPC, curation included", host)


def server_credentials(cert: Path | None, key: Path | None) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for plaintext."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise SecurityConfigError("TLS needs both --tls-cert and --tls-key")
    try:
        cert_pem = Path(cert).read_bytes()
        key_pem = Path(key).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read TLS certificate or key: {exc}") from None
    if b"-----BEGIN" not in cert_pem or b"-----BEGIN" not in key_pem:
        raise SecurityConfigError("--tls-cert and --tls-key must be PEM files")
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])
