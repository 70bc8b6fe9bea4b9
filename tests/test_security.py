"""API keys and roles, loopback-only default, TLS — over real gRPC on loopback."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from biolit_id.server.app import RunningServer, start_server
from biolit_id.server.config import ServerConfig
from biolit_id.server.grpc.auth import (
    ApiKeyFileError,
    InsecureBindError,
    SecurityConfigError,
    bearer_token,
    check_exposure,
    is_loopback,
    parse_api_keys,
    required_role,
)
from conftest import code_of, photo_bytes

IDENTIFY_KEY = "id-4f9c2e8a71b3d6c05e1f"
CURATE_KEY = "cur-9a0b7c6d5e4f3a2b1c0d"
UNKNOWN_KEY = "zz-0000000000000000000000"
KEY_FILE = f"""# biolit-id API keys
identify {IDENTIFY_KEY}

curate   {CURATE_KEY}
"""


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    path.write_text(KEY_FILE)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, demo_model_spec: str, key_file: Path) -> Iterator[RunningServer]:
    config = ServerConfig(model=demo_model_spec, data_dir=tmp_path_factory.mktemp("data"),
                          port=0, grace_seconds=0.5, api_keys=key_file)
    running = start_server(config)
    yield running
    running.stop(0.5)


@pytest.fixture(scope="module")
def channel(keyed_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{keyed_server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def keyed_stub(channel: grpc.Channel) -> pb_grpc.SpeciesIdentifierStub:
    return pb_grpc.SpeciesIdentifierStub(channel)


# ----------------------------------------------------------------- key file


def test_key_file_parses_roles_and_ignores_comments() -> None:
    keys = parse_api_keys(KEY_FILE)
    assert len(keys) == 2
    assert keys.role_for(IDENTIFY_KEY) == "identify"
    assert keys.role_for(CURATE_KEY) == "curate"


def test_near_miss_keys_are_unknown() -> None:
    keys = parse_api_keys(KEY_FILE)
    for wrong in (IDENTIFY_KEY[:-1], IDENTIFY_KEY + "x", IDENTIFY_KEY.upper(), "", UNKNOWN_KEY,
                  f"{IDENTIFY_KEY} {CURATE_KEY}"):
        assert keys.role_for(wrong) is None, wrong


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("admin sekret-sekret-sekret-1", "unknown role 'admin'"),
        ("identify", "expected '<role> <key>'"),
        ("identify a b-b-b-b-b-b-b-b-b-b", "expected '<role> <key>'"),
        ("identify short-key", "shorter than 16"),
        (f"identify {IDENTIFY_KEY}\ncurate {IDENTIFY_KEY}", "two roles"),
        ("# only a comment\n\n", "no keys"),
    ],
)
def test_bad_key_files_are_refused_without_quoting_keys(text: str, fragment: str) -> None:
    with pytest.raises(ApiKeyFileError) as info:
        parse_api_keys(text, "keys.txt")
    message = str(info.value)
    assert fragment in message
    for secret in ("sekret-sekret-sekret-1", "short-key", IDENTIFY_KEY, "b-b-b-b-b-b-b-b-b-b"):
        assert secret not in message


def test_bearer_token_parsing() -> None:
    assert bearer_token((("authorization", f"Bearer {CURATE_KEY}"),)) == CURATE_KEY
    assert bearer_token((("Authorization", f"bearer  {CURATE_KEY} "),)) == CURATE_KEY
    assert bearer_token((("authorization", f"Basic {CURATE_KEY}"),)) is None
    assert bearer_token((("authorization", "Bearer "),)) is None
    assert bearer_token((("x-api-key", CURATE_KEY),)) is None
    assert bearer_token(None) is None


def test_role_table_denies_unknown_methods_by_default() -> None:
    svc = "/biolit.v1.SpeciesIdentifier"
    for method in ("Identify", "IdentifyStream", "SearchSimilar", "ListSpecies", "GetSpecies",
                   "GetServiceInfo", "ListExemplars"):
        assert required_role(f"{svc}/{method}") == "identify"
    for method in ("AddExemplars", "RemoveExemplars", "AddSpecies", "SomeFutureRpc"):
        assert required_role(f"{svc}/{method}") == "curate"
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert required_role("/other.Service/Method") == "curate"


# ---------------------------------------------------------------- over gRPC


def test_no_key_or_unknown_key_is_unauthenticated(keyed_stub) -> None:
    request = pb.IdentifyRequest(image=photo_bytes(1))
    for metadata in (None, bearer(UNKNOWN_KEY), (("authorization", IDENTIFY_KEY),)):
        with pytest.raises(grpc.RpcError) as info:
            keyed_stub.Identify(request, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert UNKNOWN_KEY not in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        list(keyed_stub.IdentifyStream(iter([request])))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_identify_role_reads_but_cannot_curate(keyed_stub) -> None:
    md = bearer(IDENTIFY_KEY)
    response = keyed_stub.Identify(pb.IdentifyRequest(image=photo_bytes(2)), metadata=md)
    assert response.decision.method != pb.METHOD_UNSPECIFIED
    streamed = list(keyed_stub.IdentifyStream(
        iter([pb.IdentifyRequest(image=photo_bytes(3), request_id="a")]), metadata=md))
    assert [r.request_id for r in streamed] == ["a"]
    assert keyed_stub.GetServiceInfo(pb.GetServiceInfoRequest(), metadata=md).catalog_size > 0
    assert len(keyed_stub.ListSpecies(pb.ListSpeciesRequest(), metadata=md).species) > 0

    denied = {
        "AddExemplars": lambda: keyed_stub.AddExemplars(
            iter([pb.AddExemplarRequest(species="Carcinus maenas", image=photo_bytes(4))]),
            metadata=md),
        "RemoveExemplars": lambda: keyed_stub.RemoveExemplars(
            pb.RemoveExemplarsRequest(exemplar_ids=[1]), metadata=md),
        "AddSpecies": lambda: keyed_stub.AddSpecies(
            pb.AddSpeciesRequest(scientific_name="Patella vulgata"), metadata=md),
    }
    for name, call in denied.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert "curate" in info.value.details()


def test_curate_role_passes_auth_everywhere(keyed_stub) -> None:
    md = bearer(CURATE_KEY)
    assert keyed_stub.Identify(pb.IdentifyRequest(image=photo_bytes(5)), metadata=md).versions
    # Whatever the gallery answers (done, invalid, unimplemented), auth let it through.
    auth_codes = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
    assert code_of(lambda: keyed_stub.RemoveExemplars(
        pb.RemoveExemplarsRequest(exemplar_ids=[123456]), metadata=md)) not in auth_codes
    assert code_of(lambda: keyed_stub.AddSpecies(
        pb.AddSpeciesRequest(scientific_name=""), metadata=md)) not in auth_codes


def test_health_and_reflection_need_no_key(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "biolit.v1.SpeciesIdentifier" in services


def test_keys_never_reach_logs(keyed_stub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    keyed_stub.GetServiceInfo(pb.GetServiceInfoRequest(), metadata=bearer(IDENTIFY_KEY))
    code_of(lambda: keyed_stub.AddSpecies(pb.AddSpeciesRequest(scientific_name="X y"),
                                          metadata=bearer(IDENTIFY_KEY)))
    code_of(lambda: keyed_stub.GetServiceInfo(pb.GetServiceInfoRequest(),
                                              metadata=bearer(UNKNOWN_KEY)))
    access = [r for r in caplog.records if r.name == "biolit.access"]
    assert len(access) >= 3  # the calls were logged ...
    text = "\n".join(r.getMessage() for r in caplog.records)
    for key in (IDENTIFY_KEY, CURATE_KEY, UNKNOWN_KEY):
        assert key not in text  # ... without any key


# ----------------------------------------------------------------- exposure


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.0.0.5", "example.org"):
        assert not is_loopback(host), host


def test_public_bind_without_keys_is_refused_before_loading(tmp_path: Path) -> None:
    # A model spec that cannot load: the refusal must come first, and fast.
    config = ServerConfig(model="local-dir:/nonexistent", data_dir=tmp_path, host="0.0.0.0",
                          port=0)
    with pytest.raises(InsecureBindError, match="--insecure"):
        start_server(config)


def test_insecure_flag_and_key_file_allow_public_bind(caplog, key_file: Path) -> None:
    caplog.set_level(logging.WARNING, logger="biolit_id.server.grpc.auth")
    check_exposure("0.0.0.0", has_keys=True, insecure=False)
    check_exposure("0.0.0.0", has_keys=False, insecure=True)
    assert "WITHOUT authentication" in caplog.text
    check_exposure("127.0.0.1", has_keys=False, insecure=False)
    assert "loopback only" in caplog.text


def test_serve_cli_refuses_public_bind(capsys) -> None:
    from biolit_id.cli.main import main

    rc = main(["serve", "--host", "0.0.0.0", "--port", "0", "--model", "local-dir:/nonexistent"])
    assert rc == 1
    assert "--api-keys" in capsys.readouterr().err


def test_tls_needs_cert_and_key(tmp_path: Path) -> None:
    config = ServerConfig(model="local-dir:/nonexistent", data_dir=tmp_path, port=0,
                          tls_cert=tmp_path / "cert.pem")
    with pytest.raises(SecurityConfigError, match="both --tls-cert and --tls-key"):
        start_server(config)


# ---------------------------------------------------------------------- TLS


def self_signed(directory: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path, cert_pem


def test_tls_with_keys_end_to_end(tmp_path: Path, demo_model_spec: str, key_file: Path) -> None:
    cert_path, key_path, cert_pem = self_signed(tmp_path)
    config = ServerConfig(model=demo_model_spec, data_dir=tmp_path / "data", port=0,
                          grace_seconds=0.5, api_keys=key_file, tls_cert=cert_path,
                          tls_key=key_path)
    running = start_server(config)
    try:
        assert running.tls
        target = f"127.0.0.1:{running.port}"
        creds = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=cert_pem),
            grpc.access_token_call_credentials(IDENTIFY_KEY),  # sends "Bearer <key>"
        )
        with grpc.secure_channel(target, creds) as ch:
            stub = pb_grpc.SpeciesIdentifierStub(ch)
            reply = stub.Identify(pb.IdentifyRequest(image=photo_bytes(7)), timeout=30)
            assert reply.decision.method != pb.METHOD_UNSPECIFIED
            assert code_of(lambda: stub.AddSpecies(
                pb.AddSpeciesRequest(scientific_name="Patella vulgata"), timeout=10,
            )) == grpc.StatusCode.PERMISSION_DENIED
        # Without the key over TLS: unauthenticated; plaintext to a TLS port: no answer.
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(cert_pem)) as ch:
            stub = pb_grpc.SpeciesIdentifierStub(ch)
            assert code_of(lambda: stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
                           ) == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.SpeciesIdentifierStub(ch)
            assert code_of(lambda: stub.GetServiceInfo(
                pb.GetServiceInfoRequest(), metadata=bearer(IDENTIFY_KEY), timeout=5,
            )) == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the certificate refuses the server.
        (tmp_path / "other").mkdir()
        other_cert = self_signed(tmp_path / "other")[2]
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(other_cert)) as ch:
            stub = pb_grpc.SpeciesIdentifierStub(ch)
            assert code_of(lambda: stub.GetServiceInfo(
                pb.GetServiceInfoRequest(), metadata=bearer(IDENTIFY_KEY), timeout=5,
            )) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0.5)


def test_serve_cli_reports_a_bad_key_file(tmp_path: Path, capsys) -> None:
    from biolit_id.cli.main import main

    bad = tmp_path / "keys.txt"
    bad.write_text(f"root {CURATE_KEY}\n")
    rc = main(["serve", "--port", "0", "--api-keys", str(bad), "--model",
               "local-dir:/nonexistent"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "unknown role 'root'" in err and CURATE_KEY not in err
