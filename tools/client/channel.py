"""A channel to a running service, and the metadata that carries an API key."""

from __future__ import annotations

from pathlib import Path

import grpc


def open_channel(server: str, tls_ca: Path | None = None) -> grpc.Channel:
    if tls_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
        return grpc.secure_channel(server, creds)
    return grpc.insecure_channel(server)


def auth_metadata(api_key: str | None) -> list[tuple[str, str]]:
    """The call metadata carrying an API key (none without one)."""
    return [("authorization", f"Bearer {api_key}")] if api_key else []
