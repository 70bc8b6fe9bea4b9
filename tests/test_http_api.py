"""The JSON API over real HTTP on loopback, next to gRPC in the same process.

Each endpoint is called with good and bad input; where gRPC answers the same
request, both transports must agree (same decision, same error code).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
from PIL import Image

from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.app import RunningServer, start_server
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.config import ServerConfig
from biolit_id.server.web.bridge import HTTP_STATUS
from conftest import photo_bytes, stub_for

CRAB = "Carcinus maenas"
TIMEOUT = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_spec: str) -> Iterator[RunningServer]:
    config = ServerConfig(model=demo_model_spec, data_dir=tmp_path_factory.mktemp("http-api"),
                          port=0, http_port=0, grace_seconds=0.5,
                          max_message_bytes=4 * 1024 * 1024, max_image_pixels=4_000_000)
    running = start_server(config)
    yield running
    running.stop(0.5)


@pytest.fixture(scope="module")
def url(server: RunningServer) -> str:
    return server.http.url.rstrip("/")


def jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    return photo_bytes(seed, "JPEG", size)


def identify_form(url: str, image: bytes, **fields) -> requests.Response:
    return requests.post(f"{url}/v1/identify", files={"image": ("p.jpg", image, "image/jpeg")},
                         data=fields, timeout=TIMEOUT)


def error_of(response: requests.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"code", "message"}, body
    return response.status_code, body["code"], body["message"]


def test_address_and_same_servicer(server: RunningServer, url: str) -> None:
    assert server.http.port != server.port
    assert url.startswith("http://127.0.0.1:")
    assert requests.get(f"{url}/healthz", timeout=TIMEOUT).json() == {"status": "SERVING"}


def test_identify_multipart_equals_grpc(server: RunningServer, url: str) -> None:
    photo = jpeg(1)
    response = identify_form(url, photo, topK="3", requestId="h1")
    assert response.status_code == 200, response.text
    body = response.json()
    grpc_answer = stub_for(server).Identify(pb.IdentifyRequest(image=photo, top_k=3))
    decision = body["decision"]
    assert decision["method"] == pb.Method.Name(grpc_answer.decision.method)
    assert decision["species"] == grpc_answer.decision.species
    assert decision["confidence"] == pytest.approx(grpc_answer.decision.confidence, abs=1e-6)
    assert [c["species"] for c in body["prototypeCandidates"]] == \
        [c.species for c in grpc_answer.prototype_candidates]
    assert body["requestId"] == "h1"
    assert body["versions"]["modelFingerprint"] == grpc_answer.versions.model_fingerprint
    assert body["timing"]["totalMs"] > 0


def test_identify_json_image_and_embedding(url: str, loaded_demo_model) -> None:
    photo = jpeg(2)
    by_form = identify_form(url, photo).json()
    by_json = requests.post(f"{url}/v1/identify", timeout=TIMEOUT, json={
        "image": base64.b64encode(photo).decode(), "top_k": 2}).json()
    assert by_json["decision"]["species"] == by_form["decision"]["species"]
    assert len(by_json["prototypeCandidates"]) == 2
    vec = loaded_demo_model.encode_text([Catalog.load_default().get(CRAB).prompt()])[0]
    body = requests.post(f"{url}/v1/identify", json={"embedding": vec.tolist()},
                         timeout=TIMEOUT).json()
    assert body["decision"]["species"] == CRAB
    assert body["decision"]["rank"] == "RANK_SPECIES"
    ranks = {t["rank"]: t["name"] for t in body["taxonomy"]["lineage"]}
    assert ranks["RANK_FAMILY"] == "Carcinidae"
    assert {v["language"] for v in body["taxonomy"]["vernacularNames"]} >= {"fr", "en"}


@pytest.mark.parametrize(("kwargs", "status", "fragment"), [
    ({"files": {"image": ("a.txt", b"not a photo at all", "text/plain")}}, 400, "image"),
    ({"json": {}}, 400, "neither image nor embedding"),
    ({"json": {"image": base64.b64encode(b"x" * 10).decode(), "embedding": [1.0]}}, 400,
     "not both"),
    ({"json": {"embedding": [1.0, 2.0]}}, 400, "embedding_dim"),
    ({"json": {"embedding": [0.0] * 512}}, 400, "all zeros"),
    ({"json": {"topK": -1, "embedding": [1.0] * 512}}, 400, "top_k"),
    ({"json": {"restrictTo": ["Nessiteras"], "embedding": [1.0] * 512}}, 400, "unknown"),
    ({"json": {"bogus": 1}}, 400, "no field named"),
    ({"json": [1, 2]}, 400, "must be an object"),
    ({"data": b"{not json", "headers": {"content-type": "application/json"}}, 400,
     "not valid JSON"),
    ({"data": b"raw", "headers": {"content-type": "text/plain"}}, 415, "multipart/form-data"),
    ({"files": {"image": ("p.jpg", b"\xff\xd8\xff", "image/jpeg")}, "data": {"topK": "many"}},
     400, "topK"),
    ({"files": {"image": ("p.jpg", b"\xff\xd8\xff", "image/jpeg")}, "data": {"nope": "1"}},
     400, "no field"),
])
def test_identify_bad_input_is_a_clear_json_error(url: str, kwargs, status: int,
                                                 fragment: str) -> None:
    response = requests.post(f"{url}/v1/identify", timeout=TIMEOUT, **kwargs)
    got_status, code, message = error_of(response)
    assert got_status == status
    assert code == "INVALID_ARGUMENT"
    assert fragment in message
    assert identify_form(url, jpeg(3)).status_code == 200  # the service is still healthy


def test_same_error_code_as_grpc(server: RunningServer, url: str) -> None:
    stub = stub_for(server)
    truncated = jpeg(4)[:400]
    with pytest.raises(grpc.RpcError) as err:
        stub.Identify(pb.IdentifyRequest(image=truncated))
    response = identify_form(url, truncated)
    status, code, message = error_of(response)
    assert code == err.value.code().name and status == HTTP_STATUS[err.value.code()]
    assert message == err.value.details()


def test_size_and_pixel_limits(server: RunningServer, url: str) -> None:
    cap = server.state.config.max_message_bytes
    big = b"\xff\xd8" + b"\0" * (cap + 10)
    status, code, _ = error_of(identify_form(url, big))
    assert (status, code) == (413, "RESOURCE_EXHAUSTED")
    # Over the cap by the Content-Length alone: refused before the body is read.
    status, code, _ = error_of(requests.post(
        f"{url}/v1/identify", data=b"\0" * (2 * cap), timeout=TIMEOUT,
        headers={"content-type": "application/json"}))
    assert (status, code) == (413, "RESOURCE_EXHAUSTED")
    # A small file with too many pixels: the decoder's budget, as on gRPC.
    out = io.BytesIO()
    Image.new("L", (3000, 3000)).save(out, "PNG")
    status, code, message = error_of(identify_form(url, out.getvalue()))
    assert (status, code) == (400, "INVALID_ARGUMENT")
    assert "pixels" in message


def test_info_and_species(server: RunningServer, url: str) -> None:
    catalog = [s.scientific_name for s in
               stub_for(server).ListSpecies(pb.ListSpeciesRequest()).species]
    info = requests.get(f"{url}/v1/info", timeout=TIMEOUT).json()
    assert info["embeddingDim"] == 512 and info["catalogSize"] == len(catalog)
    assert info["mode"] == "zero-shot"
    species = requests.get(f"{url}/v1/species", timeout=TIMEOUT).json()["species"]
    assert [s["scientificName"] for s in species] == catalog
    crabs = requests.get(f"{url}/v1/species", params={"taxon": "Decapoda"},
                         timeout=TIMEOUT).json()["species"]
    assert CRAB in {s["scientificName"] for s in crabs} and len(crabs) < len(catalog)
    status, code, _ = error_of(requests.get(f"{url}/v1/species", params={"taxon": "Nope"},
                                            timeout=TIMEOUT))
    assert (status, code) == (404, "NOT_FOUND")
    one = requests.get(f"{url}/v1/species/{CRAB}", timeout=TIMEOUT).json()
    assert one["scientificName"] == CRAB and one["rank"] == "RANK_SPECIES"
    # A name with a slash, sent encoded.
    slash = requests.get(f"{url}/v1/species/Littorina%20fabalis%2Fobtusata", timeout=TIMEOUT)
    assert slash.json()["scientificName"] == "Littorina fabalis/obtusata"
    status, code, _ = error_of(requests.get(f"{url}/v1/species/Nessiteras", timeout=TIMEOUT))
    assert (status, code) == (404, "NOT_FOUND")


def test_gallery_round_trip(url: str) -> None:
    species = "Patella vulgata"
    photos = [jpeg(10 + i) for i in range(3)]
    added = requests.post(
        f"{url}/v1/exemplars", timeout=TIMEOUT,
        files=[("image", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(photos)],
        data={"species": species, "license": "CC-BY-4.0", "contributor": "A. Tester"})
    assert added.status_code == 200, added.text
    ids = [int(i) for i in added.json()["exemplarIds"]]
    assert len(ids) == 3 and added.json()["speciesUpdated"] == [species]
    again = requests.post(f"{url}/v1/exemplars", timeout=TIMEOUT,
                          json={"exemplars": [{"species": species,
                                               "image": base64.b64encode(photos[0]).decode()}]})
    assert [int(i) for i in again.json()["exemplarIds"]] == ids[:1]  # idempotent

    page1 = requests.get(f"{url}/v1/exemplars", timeout=TIMEOUT, params={
        "species": species, "pageSize": 2, "includeThumbnails": "true"}).json()
    assert page1["totalCount"] == "3" and len(page1["exemplars"]) == 2
    assert page1["exemplars"][0]["license"] == "CC-BY-4.0"
    assert base64.b64decode(page1["exemplars"][0]["thumbnail"])[:2] == b"\xff\xd8"
    page2 = requests.get(f"{url}/v1/exemplars", timeout=TIMEOUT, params={
        "species": species, "pageSize": 2, "pageToken": page1["nextPageToken"]}).json()
    assert [int(e["exemplarId"]) for e in page1["exemplars"] + page2["exemplars"]] == ids
    status, code, _ = error_of(requests.get(f"{url}/v1/exemplars", timeout=TIMEOUT,
                                            params={"pageToken": "forged"}))
    assert (status, code) == (400, "INVALID_ARGUMENT")

    similar = requests.post(f"{url}/v1/similar", timeout=TIMEOUT,
                            files={"image": ("q.jpg", photos[1], "image/jpeg")},
                            data={"k": "2"}).json()["results"]
    assert int(similar[0]["exemplarId"]) == ids[1] and similar[0]["score"] > 0.99
    assert similar[0]["contributor"] == "A. Tester"
    by_id = requests.post(f"{url}/v1/similar", json={"exemplarId": str(ids[0]), "k": 5},
                          timeout=TIMEOUT).json()["results"]
    assert ids[0] not in [int(r["exemplarId"]) for r in by_id]
    status, code, _ = error_of(requests.post(f"{url}/v1/similar", json={"k": 5},
                                             timeout=TIMEOUT))
    assert (status, code) == (400, "INVALID_ARGUMENT")

    answer = identify_form(url, photos[2], numSimilar="1", includeThumbnails="true").json()
    assert int(answer["similar"][0]["exemplarId"]) == ids[2]
    assert answer["similar"][0]["thumbnail"]

    removed = requests.delete(f"{url}/v1/exemplars/{ids[0]}", timeout=TIMEOUT).json()
    assert removed["removedCount"] == 1
    removed = requests.post(f"{url}/v1/exemplars:remove", json={"exemplarIds": ids[1:]},
                            timeout=TIMEOUT).json()
    assert removed["removedCount"] == 2 and removed["speciesUpdated"] == [species]
    status, code, message = error_of(requests.delete(f"{url}/v1/exemplars/{ids[0]}",
                                                     timeout=TIMEOUT))
    assert (status, code) == (404, "NOT_FOUND") and "nothing was removed" in message
    status, code, _ = error_of(requests.delete(f"{url}/v1/exemplars/abc", timeout=TIMEOUT))
    assert (status, code) == (400, "INVALID_ARGUMENT")


def test_curation_errors(url: str) -> None:
    status, code, message = error_of(requests.post(
        f"{url}/v1/exemplars", files={"image": ("p.jpg", jpeg(20), "image/jpeg")},
        data={"species": "Nessiteras rhombopteryx"}, timeout=TIMEOUT))
    assert (status, code) == (404, "NOT_FOUND") and "AddSpecies" in message
    status, code, _ = error_of(requests.post(
        f"{url}/v1/exemplars", files={"image": ("p.txt", b"text", "text/plain")},
        data={"species": CRAB}, timeout=TIMEOUT))
    assert (status, code) == (400, "INVALID_ARGUMENT")
    status, code, _ = error_of(requests.post(f"{url}/v1/exemplars", json={"species": CRAB},
                                             timeout=TIMEOUT))
    assert (status, code) == (400, "INVALID_ARGUMENT")
    status, code, message = error_of(requests.post(
        f"{url}/v1/species", json={"scientificName": "x" * 5000}, timeout=TIMEOUT))
    assert (status, code) == (400, "INVALID_ARGUMENT") and "scientific_name" in message


def test_add_species(url: str) -> None:
    name = "Goniodoris nodosa"
    assert requests.get(f"{url}/v1/species/{name}", timeout=TIMEOUT).status_code == 404
    created = requests.post(f"{url}/v1/species", timeout=TIMEOUT, json={
        "scientificName": name,
        "vernacularNames": [{"name": "Goniodoris", "language": "fr"}],
        "taxonomy": {"lineage": [{"rank": "RANK_GENUS", "name": "Goniodoris"}]}})
    assert created.status_code == 200, created.text
    assert created.json()["addedAtRuntime"] is True
    assert requests.get(f"{url}/v1/species/{name}", timeout=TIMEOUT).status_code == 200
    status, code, _ = error_of(requests.post(f"{url}/v1/species", json={"scientificName": name},
                                             timeout=TIMEOUT))
    assert (status, code) == (409, "ALREADY_EXISTS")
    added = requests.post(f"{url}/v1/exemplars", files={"image": ("a.jpg", jpeg(30),
                                                                  "image/jpeg")},
                          data={"species": name}, timeout=TIMEOUT)
    assert added.status_code == 200


def test_unknown_route_and_method_are_json(url: str) -> None:
    status, code, _ = error_of(requests.get(f"{url}/v1/nothing", timeout=TIMEOUT))
    assert (status, code) == (404, "NOT_FOUND")
    status, code, _ = error_of(requests.get(f"{url}/v1/identify", timeout=TIMEOUT))
    assert status == 405


def test_openapi_describes_every_endpoint(url: str) -> None:
    spec = requests.get(f"{url}/openapi.json", timeout=TIMEOUT).json()
    assert set(spec["paths"]) >= {
        "/v1/identify", "/v1/similar", "/v1/info", "/v1/species",
        "/v1/species/{scientific_name}", "/v1/exemplars", "/v1/exemplars:remove",
        "/v1/exemplars/{exemplar_id}"}
    schemas = spec["components"]["schemas"]
    assert schemas["IdentifyResponse"]["properties"]["decision"]["$ref"].endswith("/Decision")
    assert "METHOD_REJECTED" in schemas["Decision"]["properties"]["method"]["enum"]
    assert schemas["SimilarExemplar"]["properties"]["exemplarId"]["format"] == "int64"
    body = spec["paths"]["/v1/identify"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert requests.get(f"{url}/docs", timeout=TIMEOUT).status_code == 404  # no CDN page


def test_browser_defences(url: str) -> None:
    page = requests.get(f"{url}/", timeout=TIMEOUT)
    assert page.status_code == 200 and "<!doctype html>" in page.text.lower()
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in page.headers
    for asset in ("app.js", "i18n.js", "style.css"):
        assert requests.get(f"{url}/static/{asset}", timeout=TIMEOUT).status_code == 200
    # Another site's page cannot make the browser curate: its Origin is refused.
    status, code, _ = error_of(requests.post(
        f"{url}/v1/species", json={"scientificName": "Evil evil"}, timeout=TIMEOUT,
        headers={"Origin": "http://attacker.example"}))
    assert (status, code) == (403, "PERMISSION_DENIED")
    assert requests.get(f"{url}/v1/species/Evil evil", timeout=TIMEOUT).status_code == 404
    same = requests.post(f"{url}/v1/identify", json={"embedding": [1.0] * 512}, timeout=TIMEOUT,
                         headers={"Origin": url})
    assert same.status_code == 200
    # No keys: only loopback names are answered (DNS rebinding).
    status, code, _ = error_of(requests.get(f"{url}/v1/info", timeout=TIMEOUT,
                                            headers={"Host": "rebind.example:80"}))
    assert (status, code) == (403, "PERMISSION_DENIED")
    assert requests.get(f"{url}/v1/info", headers={"Host": "localhost"},
                        timeout=TIMEOUT).status_code == 200


# ------------------------------------------------------------------ API keys

IDENTIFY_KEY = "id-http-4f9c2e8a71b3d6c0"
CURATE_KEY = "cur-http-9a0b7c6d5e4f3a2b"


@pytest.fixture(scope="module")
def keyed_url(tmp_path_factory, demo_model_spec: str) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("http-keys")
    keys = directory / "keys.txt"
    keys.write_text(f"identify {IDENTIFY_KEY}\ncurate {CURATE_KEY}\n")
    keys.chmod(0o600)
    running = start_server(ServerConfig(model=demo_model_spec, data_dir=directory / "data",
                                        port=0, http_port=0, grace_seconds=0.5,
                                        api_keys=keys))
    yield running.http.url.rstrip("/")
    running.stop(0.5)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_and_roles(keyed_url: str) -> None:
    url = keyed_url
    for headers in ({}, bearer("zz-unknown-key-000000"), {"Authorization": CURATE_KEY}):
        status, code, _ = error_of(requests.get(f"{url}/v1/species", headers=headers,
                                                timeout=TIMEOUT))
        assert (status, code) == (401, "UNAUTHENTICATED")
    # The key is checked before the body is looked at: a bad body still gets 401.
    status, code, _ = error_of(requests.post(f"{url}/v1/identify", data=b"{",
                                             headers={"content-type": "application/json"},
                                             timeout=TIMEOUT))
    assert (status, code) == (401, "UNAUTHENTICATED")
    reader = bearer(IDENTIFY_KEY)
    assert requests.get(f"{url}/v1/species", headers=reader, timeout=TIMEOUT).status_code == 200
    assert identify_form_with(url, reader).status_code == 200
    for call in (
        lambda h: requests.post(f"{url}/v1/species", json={"scientificName": "Ab cd"},
                                headers=h, timeout=TIMEOUT),
        lambda h: requests.post(f"{url}/v1/exemplars", headers=h, timeout=TIMEOUT,
                                files={"image": ("a.jpg", jpeg(40), "image/jpeg")},
                                data={"species": CRAB}),
        lambda h: requests.delete(f"{url}/v1/exemplars/1", headers=h, timeout=TIMEOUT),
        lambda h: requests.post(f"{url}/v1/exemplars:remove", json={"exemplarIds": ["1"]},
                                headers=h, timeout=TIMEOUT),
    ):
        status, code, message = error_of(call(reader))
        assert (status, code) == (403, "PERMISSION_DENIED") and "curate" in message
        assert error_of(call({}))[:2] == (401, "UNAUTHENTICATED")
    curator = bearer(CURATE_KEY)
    added = requests.post(f"{url}/v1/exemplars", headers=curator, timeout=TIMEOUT,
                          files={"image": ("a.jpg", jpeg(40), "image/jpeg")},
                          data={"species": CRAB})
    assert added.status_code == 200
    # With keys, any Host may be used (the key is the protection).
    assert requests.get(f"{url}/v1/info", headers={**reader, "Host": "biolit.example"},
                        timeout=TIMEOUT).status_code == 200


def identify_form_with(url: str, headers: dict[str, str]) -> requests.Response:
    return requests.post(f"{url}/v1/identify", headers=headers, timeout=TIMEOUT,
                         files={"image": ("p.jpg", jpeg(41), "image/jpeg")})


def test_keys_never_in_access_log(keyed_url: str, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="biolit.access"):
        requests.get(f"{keyed_url}/v1/species", headers=bearer(CURATE_KEY), timeout=TIMEOUT)
        requests.get(f"{keyed_url}/v1/species", headers=bearer(IDENTIFY_KEY + "x"),
                     timeout=TIMEOUT)
    lines = [r.getMessage() for r in caplog.records if r.name == "biolit.access"]
    assert any('"method": "ListSpecies"' in line and '"code": "OK"' in line for line in lines)
    assert any('"code": "UNAUTHENTICATED"' in line for line in lines)
    assert not any(CURATE_KEY in line or IDENTIFY_KEY in line for line in lines)


def test_serve_cli_prints_the_page_address(tmp_path: Path, demo_model_spec: str) -> None:
    import re
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "biolit_id.cli.main", "serve", "--model", demo_model_spec,
         "--data-dir", str(tmp_path / "d"), "--port", "0", "--http-port", "0",
         "--runtime", "torch", "--precision", "fp32"],
        stdout=subprocess.PIPE, stderr=open(tmp_path / "log", "w"), text=True)  # noqa: SIM115
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        match = re.search(r"web page and JSON API: (http://127\.0\.0\.1:\d+/)", lines[1])
        assert match, f"{lines!r}; see {tmp_path / 'log'}"
        page = requests.get(match.group(1), timeout=TIMEOUT)
        assert page.status_code == 200 and "/static/app.js" in page.text
    finally:
        proc.terminate()
        proc.wait(30)
