"""Identification on the device, in Chromium: /v1/models, the service worker, offline.

A real server with the demo model (zero-shot) serves the page; Playwright drives
Debian's Chromium (see test_web_page.py). After one online visit the network is
cut: the page reloads from the service worker, a photo gets its answer from
onnxruntime-web in the page, and when the network returns the server's answer
for the same photo (sent as the embedding) is the same.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from playwright.sync_api import Browser, expect
from test_web_page import TIMEOUT_MS, decision_of, page_server, url_of

from biolit_id.server.app import RunningServer
from biolit_id.server.inference.preprocess import preprocess
from conftest import photo_bytes

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def device_server(tmp_path_factory, demo_model_spec: str) -> Iterator[RunningServer]:
    running = page_server(tmp_path_factory.mktemp("device"), demo_model_spec)
    yield running
    running.stop(0.5)


def get(running: RunningServer, path: str, **kwargs) -> requests.Response:
    return requests.get(url_of(running) + path.lstrip("/"), timeout=120, **kwargs)


def answer_text(decision: dict) -> str:
    """What the card's ``.decision`` says for a decision (species, taxon, or don't know)."""
    if decision.get("method") == "METHOD_REJECTED" or not (decision.get("species")
                                                           or decision.get("taxon")):
        return "Don't know"
    return decision.get("species") or decision["taxon"]


def test_models_lists_the_artifacts_with_digests_and_caching(device_server):
    listing = get(device_server, "/v1/models")
    assert listing.status_code == 200
    assert listing.headers["cache-control"] == "no-cache"
    body = listing.json()
    assert body["model_fingerprint"] == device_server.state.model.fingerprint
    assert get(device_server, "/v1/models",
               headers={"if-none-match": listing.headers["etag"]}).status_code == 304
    by_name = {(a["name"], a["variant"]): a for a in body["artifacts"]}
    assert {("image_tower", "fp32"), ("decision", "onnx"), ("preprocessing", "json")} <= set(
        by_name)
    assert body["gates"]["int8"]["passed"] == (("image_tower", "int8") in by_name)
    for entry in body["artifacts"]:
        response = get(device_server, entry["url"])
        assert response.status_code == 200
        assert len(response.content) == entry["bytes"]
        assert hashlib.sha256(response.content).hexdigest() == entry["sha256"]
        assert response.headers["etag"] == f'"{entry["sha256"]}"'
        assert "immutable" in response.headers["cache-control"]
        assert get(device_server, entry["url"],
                   headers={"if-none-match": response.headers["etag"]}).status_code == 304
    spec = get(device_server, by_name[("preprocessing", "json")]["url"]).json()
    assert spec["size"] == device_server.state.model.image_size
    assert by_name[("decision", "onnx")]["metadata"]["species"]
    assert get(device_server, "/v1/models/decision/onnx-0000000000000000.onnx"
               ).status_code == 404
    page = get(device_server, "/")
    assert page.headers["cross-origin-opener-policy"] == "same-origin"
    assert page.headers["cross-origin-embedder-policy"] == "require-corp"
    assert "'wasm-unsafe-eval'" in page.headers["content-security-policy"]
    worker = get(device_server, "/sw.js")
    assert worker.headers["service-worker-allowed"] == "/"


def png_bytes(seed: int) -> bytes:
    img = Image.open(io.BytesIO(photo_bytes(seed, size=(301, 207))))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def page_pixels(page, data: bytes, mime: str) -> np.ndarray:
    values = page.evaluate("""async ([b64, mime]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const s = await BIOLIT_DEVICE.load();
        return Array.from(await BIOLIT_DEVICE.preprocess(new Blob([bytes], { type: mime }),
                                                         s.spec));
    }""", [base64.b64encode(data).decode(), mime])
    return np.asarray(values, dtype=np.float32)


def page_embedding(page, data: bytes) -> np.ndarray:
    values = page.evaluate("""async (b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        return Array.from(await BIOLIT_DEVICE.embed(new Blob([bytes], { type: "image/jpeg" })));
    }""", base64.b64encode(data).decode())
    return np.asarray(values, dtype=np.float64)


def open_device_page(browser: Browser, running: RunningServer):
    context = browser.new_context(locale="en-GB")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url_of(running))
    page.wait_for_selector("body[data-ready]")
    page.wait_for_selector("body[data-device=cached]")  # downloaded, not compiled
    return context, page


def test_page_pixels_and_embeddings_equal_the_servers(browser: Browser, device_server):
    context, page = open_device_page(browser, device_server)
    assert page.evaluate("self.crossOriginIsolated")  # WASM threads are on
    policy = device_server.state.identifier.policy
    for data, mime in ((photo_bytes(11), "image/jpeg"), (png_bytes(12), "image/png"),
                       (photo_bytes(13, size=(448, 600)), "image/jpeg")):
        expected = preprocess(data, policy)
        got = page_pixels(page, data, mime).reshape(expected.shape)
        assert np.array_equal(got, expected), (mime, float(np.abs(got - expected).max()))
    cosines = []
    for seed in (21, 22, 23):
        data = photo_bytes(seed)
        server = device_server.state.embedder.embed(preprocess(data, policy)[None])[0]
        mine = page_embedding(page, data)
        cosines.append(float(mine @ server / np.linalg.norm(mine) / np.linalg.norm(server)))
    assert min(cosines) >= 0.9999, cosines
    context.close()


def test_offline_reload_answers_on_the_device_as_the_server_does(browser: Browser,
                                                                 device_server, tmp_path: Path):
    context, page = open_device_page(browser, device_server)  # the one online visit
    page.wait_for_function("navigator.serviceWorker.controller !== null || "
                           "navigator.serviceWorker.ready.then(() => true)")
    page.evaluate("navigator.serviceWorker.ready")
    photos = [photo_bytes(seed) for seed in (31, 32, 33)]
    expected = [answer_text(decision_of(device_server, p)) for p in photos]

    context.set_offline(True)
    page.reload()
    page.wait_for_selector("body[data-ready]")
    for i, photo in enumerate(photos):
        path = tmp_path / f"shore-{i}.jpg"
        path.write_bytes(photo)
        page.set_input_files("#pick", str(path))
    cards = page.locator(".result[data-state=done][data-source=device]")
    expect(cards).to_have_count(len(photos))
    expect(page.locator(".result[data-queued=true]")).to_have_count(len(photos))
    # Newest first: the cards are in the reverse order of the photos.
    device_answers = [cards.nth(len(photos) - 1 - i).locator(".decision").inner_text()
                      for i in range(len(photos))]
    assert device_answers == expected
    queued = page.evaluate("BIOLIT_DEVICE.queue.all().then((q) => q.length)")
    assert queued == len(photos)

    context.set_offline(False)  # the network returns: the queue goes to the server
    served = page.locator(".result[data-state=done][data-source=server]")
    expect(served).to_have_count(len(photos))
    server_answers = [served.nth(len(photos) - 1 - i).locator(".decision").inner_text()
                      for i in range(len(photos))]
    assert server_answers == expected
    expect(served.first.locator(".device-badge")).to_have_count(0)
    assert page.evaluate("BIOLIT_DEVICE.queue.all().then((q) => q.length)") == 0
    context.close()


def test_chosen_on_device_online_then_confirmed_by_the_server(browser: Browser, device_server,
                                                             tmp_path: Path):
    context, page = open_device_page(browser, device_server)
    page.check("#on-device")
    photo = photo_bytes(41)
    path = tmp_path / "chosen.jpg"
    path.write_bytes(photo)
    page.set_input_files("#pick", str(path))
    card = page.locator(".result[data-state=done][data-source=server]").first
    expect(card.locator(".decision")).to_have_text(answer_text(decision_of(device_server, photo)))
    context.close()
