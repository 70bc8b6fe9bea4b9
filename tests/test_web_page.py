"""The web page in a real browser: Debian's Chromium driven by Playwright.

No browser is downloaded: Playwright is pointed at the OS package
(``apt-get install chromium``; ``.ci/run`` installs it; ``BIOLIT_CHROMIUM``
overrides the path). The page talks to a real server started in-process.
The screenshots in docs/screenshots/ are these tests' own, rewritten when
``BIOLIT_SCREENSHOTS=1`` (otherwise they go to a temporary folder, so that
a test run leaves the checkout as it was).
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image
from playwright.sync_api import Browser, Page, expect

from biolit_id.server.app import RunningServer, start_server
from biolit_id.server.config import ServerConfig
from conftest import photo_bytes

DOC_SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"

CURATE_KEY = "cur-web-5d4c3b2a1f0e9d8c"
IDENTIFY_KEY = "id-web-0a1b2c3d4e5f6a7b"
TIMEOUT_MS = 60_000
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("BIOLIT_SCREENSHOTS") == "1":
        DOC_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return DOC_SCREENSHOTS
    return tmp_path_factory.mktemp("screenshots")


def page_server(directory: Path, model: str, **overrides) -> RunningServer:
    """A service with its web page on free ports (the page tests share it)."""
    config = ServerConfig(model=model, data_dir=directory / "data", port=0, http_port=0,
                          grace_seconds=0.5, **overrides)
    return start_server(config)


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, demo_model_spec: str) -> Iterator[RunningServer]:
    """No keys, loopback: the page may curate without a key."""
    running = page_server(tmp_path_factory.mktemp("web-open"), demo_model_spec)
    yield running
    running.stop(0.5)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, demo_model_spec: str) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("web-keys")
    keys = directory / "keys.txt"
    keys.write_text(f"curate {CURATE_KEY}\nidentify {IDENTIFY_KEY}\n")
    keys.chmod(0o600)
    running = page_server(directory, demo_model_spec, api_keys=keys)
    yield running
    running.stop(0.5)


def url_of(running: RunningServer) -> str:
    return running.http.url


def api(running: RunningServer, method: str, path: str, key: str | None = None, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = requests.request(method, url_of(running) + path.lstrip("/"), headers=headers,
                                timeout=60, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def decision_of(running: RunningServer, photo: bytes, key: str | None = None) -> dict:
    return api(running, "POST", "/v1/identify", key,
               files={"image": ("p.jpg", photo, "image/jpeg")})["decision"]


def find_seed(running: RunningServer, rejected: bool, key: str | None = None) -> int:
    """A synthetic photo the (random) demo model accepts, or one it rejects."""
    for seed in range(60):
        method = decision_of(running, photo_bytes(seed), key)["method"]
        if (method == "METHOD_REJECTED") == rejected:
            return seed
    raise AssertionError(f"no photo among 60 is {'rejected' if rejected else 'accepted'}")


def write_photo(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def open_page(browser: Browser, running: RunningServer, viewport=DESKTOP, **options) -> Page:
    context = browser.new_context(viewport=viewport, locale="en-GB", **options)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url_of(running))
    page.wait_for_selector("body[data-ready]")
    return page


def seed_gallery(running: RunningServer, key: str | None = None) -> None:
    for i, species in enumerate(("Carcinus maenas", "Patella vulgata", "Fucus vesiculosus")):
        api(running, "POST", "/v1/exemplars", key,
            files=[("image", (f"{i}-{j}.jpg", photo_bytes(500 + 10 * i + j), "image/jpeg"))
                   for j in range(2)],
            data={"species": species, "license": "CC-BY-4.0",
                  "contributor": f"Observer {i}"})


@pytest.fixture
def empty_server(tmp_path, demo_model_spec: str) -> Iterator[RunningServer]:
    """A server of its own, whose gallery no other test has filled."""
    running = page_server(tmp_path / "empty", demo_model_spec)
    yield running
    running.stop(0.5)


def test_dont_know_is_said_plainly(browser: Browser, empty_server, tmp_path):
    # With an empty gallery some synthetic photos are rejected by the random model.
    seed = find_seed(empty_server, rejected=True)
    page = open_page(browser, empty_server)
    page.set_input_files("#pick", str(write_photo(tmp_path, "blur.jpg", photo_bytes(seed))))
    card = page.locator(".result[data-state=done]").first
    expect(card.locator(".decision")).to_have_text("Don't know")
    page.locator("#lang").click()
    expect(card.locator(".decision")).to_have_text("Je ne sais pas")
    expect(page.locator("#identify-heading")).to_have_text("Identifier une photo")
    expect(page.locator("html")).to_have_attribute("lang", "fr")


def test_identify_shows_answer_and_similar_photos(browser: Browser, open_server, tmp_path,
                                                  screenshots):
    seed_gallery(open_server)
    seed = find_seed(open_server, rejected=False)
    photo = photo_bytes(seed)
    expected = decision_of(open_server, photo)
    page = open_page(browser, open_server)
    page.set_input_files("#pick", str(write_photo(tmp_path, "shore.jpg", photo)))
    card = page.locator(".result[data-state=done]").first
    expect(card).to_be_visible()
    expect(card.locator(".decision")).to_have_text(expected["species"])
    expect(card.locator(".confidence")).to_contain_text(
        f"{round(expected['confidence'] * 100)} %")
    expect(card.locator(".lineage li")).to_have_count(7)  # kingdom ... species
    expect(card.locator(".names [lang=en]")).not_to_be_empty()
    expect(card.locator(".names [lang=fr]")).not_to_be_empty()
    expect(card.locator(".candidates li").first).to_be_visible()
    thumbs = card.locator(".similar .thumb")
    expect(thumbs).to_have_count(6)
    first = thumbs.first
    assert first.locator("img").get_attribute("src").startswith("data:image/jpeg;base64,")
    expect(first.locator("figcaption")).to_contain_text("CC-BY-4.0")
    expect(first.locator("figcaption")).to_contain_text("Observer")
    # The species page: its reference photos, paged.
    card.locator(".decision a").click()
    expect(page.locator("#species-name")).to_have_text(expected["species"])
    expect(page.locator("#species-photos .thumb")).to_have_count(
        int(api(open_server, "GET", "/v1/species/" + expected["species"])["exemplarCount"]))
    page.go_back()
    expect(page.locator(".result[data-state=done]")).to_have_count(1)  # the answer is kept
    page.screenshot(path=str(screenshots / "desktop.png"), full_page=True)


def test_curator_adds_a_photo_and_the_next_identification_lists_it(browser: Browser,
                                                                     keyed_server, tmp_path):
    seed_gallery(keyed_server, CURATE_KEY)
    page = open_page(browser, keyed_server)
    expect(page.locator("#notice")).to_contain_text("needs an API key")
    page.locator("#key-button").click()
    page.locator("#key-input").fill(CURATE_KEY)
    page.locator("#key-save").click()
    expect(page.locator("#key-button")).to_have_text("Key set ✓")
    photo = photo_bytes(901)
    page.set_input_files("#pick", str(write_photo(tmp_path, "new.jpg", photo)))
    card = page.locator(".result[data-state=done]").first
    expect(card).to_be_visible()
    form = card.locator("form.add-exemplar")
    expect(form).to_be_visible()
    species_input = form.locator("input[name=species]")
    species_input.fill("Nucella lap")
    # The type-ahead offers the catalog's names.
    options = page.locator("#species-list option[value='Nucella lapillus']")
    expect(options).to_have_count(1)
    species_input.fill("Nucella lapillus")
    form.locator("input[name=license]").fill("CC0")
    form.locator("input[name=contributor]").fill("Curator C.")
    form.locator("button[type=submit]").click()
    done = form.locator(".done")
    expect(done).to_contain_text("Nucella lapillus")
    new_id = done.get_attribute("data-exemplar-id")
    listed = api(keyed_server, "GET", "/v1/exemplars", CURATE_KEY,
                 params={"species": "Nucella lapillus"})["exemplars"]
    assert [e["exemplarId"] for e in listed] == [new_id]
    assert listed[0]["license"] == "CC0" and listed[0]["contributor"] == "Curator C."

    # A similar photo (same scene, re-encoded smaller) now lists it first.
    out = io.BytesIO()
    Image.open(io.BytesIO(photo)).resize((280, 210)).save(out, "JPEG", quality=80)
    page.set_input_files("#pick", str(write_photo(tmp_path, "again.jpg", out.getvalue())))
    latest = page.locator(".result").first
    expect(latest).to_have_attribute("data-state", "done")
    first_thumb = latest.locator(".similar .thumb").first
    expect(first_thumb).to_have_attribute("data-exemplar-id", new_id)
    expect(first_thumb.locator("figcaption")).to_contain_text("CC0")

    # Remove a reference photo from the species page (two clicks: arm, confirm).
    page.goto(url_of(keyed_server) + "#/species/Nucella%20lapillus")
    thumb = page.locator(f"#species-photos [data-exemplar-id='{new_id}']")
    expect(thumb).to_be_visible()
    thumb.locator("button.remove").click()
    expect(thumb.locator("button.remove")).to_have_text("Confirm removal")
    thumb.locator("button.remove").click()
    expect(page.locator("#notice")).to_contain_text(f"#{new_id} removed")
    assert api(keyed_server, "GET", "/v1/exemplars", CURATE_KEY,
               params={"species": "Nucella lapillus"})["totalCount"] == "0"

    # Add a species by name; it is then in the type-ahead and answerable.
    new = "Goniodoris nodosa"
    page.goto(url_of(keyed_server) + "#/curate")
    expect(page.locator(f"#species-list option[value='{new}']")).to_have_count(0)
    page.locator("#new-name").fill(new)
    page.locator("#new-fr").fill("Goniodoris")
    page.locator("#add-species button[type=submit]").click()
    expect(page.locator("#notice")).to_contain_text(f"{new} added")
    expect(page.locator(f"#species-list option[value='{new}']")).to_have_count(1)
    species = api(keyed_server, "GET", f"/v1/species/{new}", CURATE_KEY)
    assert species["addedAtRuntime"] is True


def test_identify_key_cannot_curate_and_is_told_why(browser: Browser, keyed_server, tmp_path):
    page = open_page(browser, keyed_server)
    page.locator("#key-button").click()
    page.locator("#key-input").fill(IDENTIFY_KEY)
    page.locator("#key-save").click()
    page.set_input_files("#pick", str(write_photo(tmp_path, "p.jpg", photo_bytes(902))))
    form = page.locator(".result[data-state=done] form.add-exemplar").first
    form.locator("input[name=species]").fill("Carcinus maenas")
    form.locator("button[type=submit]").click()
    expect(page.locator("#error")).to_contain_text("This key may not do that")
    expect(page.locator("#error")).to_contain_text("curate")


def test_sessionstorage_key_never_leaves_as_cookie_or_url(browser: Browser, keyed_server):
    page = open_page(browser, keyed_server)
    sent: list[dict[str, str]] = []
    page.on("request", lambda r: sent.append({"url": r.url, **r.headers}))
    page.locator("#key-button").click()
    page.locator("#key-input").fill(CURATE_KEY)
    page.locator("#key-save").click()
    expect(page.locator("#key-button")).to_have_text("Key set ✓")
    page.wait_for_selector("#species-list option", state="attached")
    api_calls = [r for r in sent if "/v1/" in r["url"]]
    assert api_calls and all(r.get("authorization") == f"Bearer {CURATE_KEY}"
                             for r in api_calls)
    assert not any(CURATE_KEY in r["url"] or CURATE_KEY in r.get("cookie", "") for r in sent)
    assert page.context.cookies() == []


def test_non_image_file_gets_a_readable_error_and_the_page_keeps_working(
        browser: Browser, open_server, tmp_path):
    page = open_page(browser, open_server)
    notes = write_photo(tmp_path, "notes.txt", b"field notes, not a photo")
    page.set_input_files("#pick", str(notes))
    failed = page.locator(".result[data-state=error]").first
    expect(failed).to_contain_text("This file is not a readable photo")
    expect(failed).to_contain_text("notes.txt")
    page.set_input_files("#pick", str(write_photo(tmp_path, "ok.jpg", photo_bytes(3))))
    expect(page.locator(".result").first).to_have_attribute("data-state", "done")
    expect(page.locator(".result")).to_have_count(2)


def test_phone_screen(browser: Browser, open_server, tmp_path, screenshots):
    page = open_page(browser, open_server, viewport=PHONE, is_mobile=True, has_touch=True)
    seed = find_seed(open_server, rejected=False)
    page.set_input_files("#camera", str(write_photo(tmp_path, "camera.jpg", photo_bytes(seed))))
    card = page.locator(".result[data-state=done]").first
    expect(card.locator(".decision")).not_to_be_empty()
    expect(card.locator(".similar .thumb").first).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways ({width} px)"
    for selector in ("label[for=pick]", "label[for=camera]", "#lang", "#key-button"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["height"] >= 40 and box["x"] + box["width"] <= 390
    page.screenshot(path=str(screenshots / "phone.png"), full_page=True)


def test_keyboard_only(browser: Browser, open_server):
    page = open_page(browser, open_server)
    page.keyboard.press("Tab")
    expect(page.locator(".skip")).to_be_focused()
    seen = []
    for _ in range(12):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    assert "pick" in seen and "camera" in seen and "lang" in seen and "key-button" in seen
    page.locator("#lang").focus()
    page.keyboard.press("Enter")
    expect(page.locator("html")).to_have_attribute("lang", "fr")
    page.locator("#key-button").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#key-input")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator("#key-dialog")).not_to_be_visible()


def test_drop_a_photo(browser: Browser, open_server):
    page = open_page(browser, open_server)
    out = io.BytesIO()
    Image.open(io.BytesIO(photo_bytes(4))).save(out, "PNG")
    data = list(out.getvalue())
    page.evaluate("""(bytes) => {
        const file = new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"});
        const transfer = new DataTransfer();
        transfer.items.add(file);
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", data)
    expect(page.locator(".result").first).to_have_attribute("data-state", "done")


def test_species_page_is_paged(browser: Browser, open_server):
    import numpy as np

    species = "Mytilus edulis"
    rng = np.random.default_rng(7)
    api(open_server, "POST", "/v1/exemplars", json={"exemplars": [
        {"species": species, "embedding": rng.normal(size=512).tolist(), "license": "CC0"}
        for _ in range(14)]})
    page = open_page(browser, open_server)
    page.goto(url_of(open_server) + "#/species/Mytilus%20edulis")
    expect(page.locator("#species-name")).to_have_text(species)
    expect(page.locator("#species-photos-heading")).to_have_text("Reference photos (14)")
    expect(page.locator("#species-lineage li")).to_have_count(7)
    expect(page.locator("#species-names [lang=fr]")).not_to_be_empty()
    photos = page.locator("#species-photos .thumb")
    expect(photos).to_have_count(12)
    expect(page.locator("#species-prev")).to_be_disabled()
    first_page = photos.evaluate_all("els => els.map(e => e.dataset.exemplarId)")
    page.locator("#species-next").click()
    expect(page.locator("#species-page")).to_have_text("Page 2")
    expect(photos).to_have_count(2)
    expect(page.locator("#species-next")).to_be_disabled()
    second_page = photos.evaluate_all("els => els.map(e => e.dataset.exemplarId)")
    assert not set(first_page) & set(second_page)
    page.locator("#species-prev").click()
    expect(photos).to_have_count(12)



def test_large_photos_are_downsized_before_upload(browser: Browser, open_server):
    page = open_page(browser, open_server)
    original = photo_bytes(7, size=(3000, 2250))
    sent = page.evaluate("""async (b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const blob = await window.BIOLIT_UPLOAD.downsizeForUpload(
            new Blob([bytes], { type: "image/jpeg" }));
        const bitmap = await createImageBitmap(blob);
        return { size: blob.size, type: blob.type, w: bitmap.width, h: bitmap.height };
    }""", base64.b64encode(original).decode("ascii"))
    assert sent["type"] == "image/jpeg" and sent["size"] < len(original) / 4, sent
    assert min(sent["w"], sent["h"]) == 448 and sent["w"] > sent["h"], sent
