"""The page's observations, place and date from EXIF, geolocation, crop and unsure answers.

Headless Chromium (the OS package) through Playwright, against a real server started
in-process with the demo model, a SYNTHETIC bundle and a place-and-season prior
(``biolit_id.cli.training.synthetic_observations``, as in tests/test_observation_grpc.py). The
photos are real JPEG files written here with Pillow, carrying EXIF GPS positions and original
dates (or none). What the page sends is read from the request itself (Playwright's
request interception: URL, form fields or JSON, the image's pixel size); what it shows
is read from the result card. The demo model is random: answers are meaningless, so the
card is checked against the answer the server actually gave.
"""

from __future__ import annotations

import base64
import datetime as dt
import email
import email.policy
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Route, expect
from test_web_page import DESKTOP, PHONE, open_page, page_server

from biolit_id.cli.training.prior_fit import clean_records, fit_prior
from biolit_id.cli.training.synthetic_observations import (
    fit_temperature,
    make_world,
    occurrences,
    world_bundle,
)
from biolit_id.server.app import RunningServer
from biolit_id.server.decision.observations import CombinerParams
from conftest import photo_bytes

ROSCOFF = (48.73, -3.98)
SIZES = {"desktop": {"viewport": DESKTOP},
         "phone": {"viewport": PHONE, "is_mobile": True, "has_touch": True}}
SHORT_SIDE = 448  # app.js UPLOAD_SHORT_SIDE


# ---------------------------------------------------------------- server and photos


@pytest.fixture(scope="module")
def obs_server(tmp_path_factory, loaded_demo_model, demo_model_spec) -> Iterator[RunningServer]:
    """The demo model with a synthetic bundle, prior and combiner: the prior applies."""
    world = make_world(512, seed=0)
    model = loaded_demo_model
    root = tmp_path_factory.mktemp("web-obs")
    bundle = world_bundle(world, fit_temperature(world, 7), model.spec, model.fingerprint)
    directory = bundle.save(root / "bundle")
    names, lat, lon, day, _ = clean_records(pd.DataFrame(occurrences(world, 200)), world.names)
    fit_prior(names, lat, lon, day).save(directory / "prior")
    CombinerParams(rho=0.1, outlier=0.05, prior_weight=1.0, prior_floor=0.05).save(
        directory / "prior")
    running = page_server(root, demo_model_spec, bundle=directory)
    yield running
    running.stop(0.5)


def _dms(value: float) -> tuple[float, float, float]:
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    seconds = round((value - degrees - minutes / 60) * 3600, 4)
    return (float(degrees), float(minutes), seconds)


def tiled(seed: int, size: tuple[int, int]) -> Image.Image:
    """Four different synthetic scenes, one per quarter: a crop changes what is seen."""
    w, h = size[0] // 2, size[1] // 2
    image = Image.new("RGB", (2 * w, 2 * h))
    for i in range(4):
        tile = Image.open(io.BytesIO(photo_bytes(seed * 10 + i, size=(w, h))))
        image.paste(tile, ((i % 2) * w, (i // 2) * h))
    return image


def exif_jpeg(seed: int, place: tuple[float, float] | None = None,
              taken: dt.datetime | None = None, size: tuple[int, int] = (800, 600),
              quarters: bool = False) -> bytes:
    """A real JPEG; with EXIF GPS (degrees, minutes, seconds) and DateTimeOriginal if given."""
    image = tiled(seed, size) if quarters else Image.open(io.BytesIO(photo_bytes(seed, size=size)))
    out = io.BytesIO()
    if place is None and taken is None:
        image.save(out, "JPEG", quality=92)  # no EXIF at all
        return out.getvalue()
    exif = Image.Exif()
    exif[0x010F] = "BioLit test camera"  # Make
    if taken is not None:
        exif.get_ifd(0x8769)[0x9003] = taken.strftime("%Y:%m:%d %H:%M:%S")  # DateTimeOriginal
    if place is not None:
        gps = exif.get_ifd(0x8825)
        gps[0] = b"\x02\x03\x00\x00"  # GPSVersionID
        gps[1], gps[2] = ("N" if place[0] >= 0 else "S"), _dms(abs(place[0]))
        gps[3], gps[4] = ("E" if place[1] >= 0 else "W"), _dms(abs(place[1]))
    image.save(out, "JPEG", quality=92, exif=exif)
    return out.getvalue()


def test_the_test_photos_carry_exif(tmp_path: Path) -> None:
    data = exif_jpeg(1, ROSCOFF, dt.datetime(2023, 6, 1, 10, 15))
    exif = Image.open(io.BytesIO(data)).getexif()
    gps = exif.get_ifd(0x8825)
    lat = sum(float(v) / 60 ** i for i, v in enumerate(gps[2]))
    assert gps[1] == "N" and gps[3] == "W" and lat == pytest.approx(48.73, abs=1e-6)
    assert exif.get_ifd(0x8769)[0x9003] == "2023:06:01 10:15:00"
    assert not Image.open(io.BytesIO(exif_jpeg(1))).getexif()


def write(directory: Path, name: str, data: bytes) -> str:
    path = directory / name
    path.write_bytes(data)
    return str(path)


# ---------------------------------------------------------------- what the page sends


class Sent:
    """Every identify call the page makes, as sent (interception sees blob bodies)."""

    def __init__(self, page: Page) -> None:
        self.calls: list[dict] = []
        page.route("**/v1/identify*", self._record)

    def _record(self, route: Route) -> None:
        request = route.request
        if request.method == "POST":
            self.calls.append({"path": request.url.split("/", 3)[3].split("?")[0],
                               "type": request.headers.get("content-type", ""),
                               "body": request.post_data_buffer or b""})
        route.continue_()

    def to(self, path: str) -> list[dict]:
        return [c for c in self.calls if c["path"] == path]


def form_fields(call: dict) -> list[tuple[str, str | bytes]]:
    """The parts of a multipart body, files as bytes, in order."""
    assert call["type"].startswith("multipart/form-data"), call["type"]
    message = email.message_from_bytes(
        b"Content-Type: " + call["type"].encode() + b"\r\n\r\n" + call["body"],
        policy=email.policy.HTTP)
    out: list[tuple[str, str | bytes]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        out.append((name, payload if part.get_filename() else payload.decode()))
    return out


def json_body(call: dict) -> dict:
    assert call["type"].startswith("application/json"), call["type"]
    return json.loads(call["body"])


def image_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image.size


def sent_image(call: dict) -> bytes:
    if call["type"].startswith("application/json"):
        return base64.b64decode(json_body(call)["image"])
    return next(v for n, v in form_fields(call) if n == "image")


def expectation(factor: float) -> str:
    """app.js expectation(): how a prior factor reads (a flag, never a filter)."""
    if abs(factor - 1) < 1e-9:
        return "none"
    if factor > 1:
        return "expected"
    return "seldom" if factor >= 0.25 else "rare"


def new_page(browser: Browser, running: RunningServer, size: str, **options) -> Page:
    return open_page(browser, running, **SIZES[size], **options)


def answered(page: Page, path: str):
    return page.expect_response(lambda r: r.url.endswith(path) and r.request.method == "POST")


def check_decision(card, response: dict) -> None:
    d = response["decision"]
    if d["method"] == "METHOD_REJECTED" or not (d["species"] or d["taxon"]):
        expect(card.locator(".decision")).to_have_text("Don't know")
    elif d["species"]:
        expect(card.locator(".decision")).to_have_text(d["species"])
    else:
        expect(card.locator(".decision")).to_contain_text(d["taxon"])
    expect(card.locator(".confidence")).to_contain_text(f"Confidence: {percent(d['confidence'])}")


def percent(x: float) -> str:
    """app.js percent()."""
    value = max(0.0, min(1.0, x)) * 100
    return (f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}") + " %"


def no_sideways_scroll(page: Page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    viewport = page.viewport_size["width"]
    assert width <= viewport, f"the page scrolls sideways ({width} px > {viewport})"


# ---------------------------------------------------------------- observations


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_three_photos_with_exif_are_one_observation_and_split_into_three(
        browser: Browser, obs_server, tmp_path, size) -> None:
    taken = dt.datetime(2023, 6, 1, 10, 15)
    files = [write(tmp_path, f"find-{i}.jpg",
                   exif_jpeg(40 + i, ROSCOFF, taken + dt.timedelta(minutes=i)))
             for i in range(3)]
    page = new_page(browser, obs_server, size)
    sent = Sent(page)
    with answered(page, "/v1/identify-observation") as got:
        page.set_input_files("#pick", files)
    response = got.value.json()
    card = page.locator(".result").first
    expect(card).to_have_attribute("data-state", "done")

    # One request, to the observation endpoint, with the place and date from the EXIF.
    assert [c["path"] for c in sent.calls] == ["v1/identify-observation"]
    fields = form_fields(sent.calls[0])
    images = [v for n, v in fields if n == "image"]
    values = {n: v for n, v in fields if n != "image"}
    assert len(images) == 3
    assert all(image_size(i) == (597, SHORT_SIDE) for i in images)  # 800x600, downsized
    assert float(values["latitude"]) == pytest.approx(ROSCOFF[0], abs=1e-6)
    assert float(values["longitude"]) == pytest.approx(ROSCOFF[1], abs=1e-6)
    assert values["observedOn"] == "2023-06-01"
    assert "uncertainty_m" not in values

    # The card: the combined decision, each photo's part, the place-and-season flags.
    expect(card).to_have_attribute("data-mode", "observation")
    expect(card.locator(".find-kind")).to_have_text("Observation — 3 photos")
    check_decision(card, response)
    expect(card.locator("input[name=latitude]")).to_have_value("48.73")
    expect(card.locator("input[name=longitude]")).to_have_value("-3.98")
    expect(card.locator("input[name=observedOn]")).to_have_value("2023-06-01")
    expect(card.locator(".place-source")).to_have_text("Position read from photo 1 (EXIF).")
    expect(card.locator(".date-source")).to_have_text("Date read from photo 1 (EXIF).")
    contributions = card.locator(".contributions li")
    expect(contributions).to_have_count(3)
    for i, evidence in enumerate(response["evidence"]["photos"]):
        expect(contributions.nth(i)).to_contain_text(f"Photo {i + 1} (find-{i}.jpg)")
        expect(contributions.nth(i)).to_contain_text(evidence["topSpecies"])
    prior = response["evidence"]["prior"]
    assert prior["applied"] and prior["usedLocation"] and prior["usedDate"], prior
    section = card.locator(".prior")
    expect(section).to_have_attribute("data-applied", "1")
    expect(section.locator(".prior-used")).to_contain_text("Place used: yes · date used: yes")
    shifts = section.locator(".shifts li")
    expect(shifts).to_have_count(len(prior["shifts"]))  # a flag, never a hidden species
    for shift in prior["shifts"]:
        flag = shifts.filter(has=page.locator(f"a:text-is('{shift['species']}')")).locator(".flag")
        expect(flag).to_have_attribute("data-expect", expectation(shift["priorFactor"]))
    expect(section.locator(".flag").first).to_contain_text(
        {"expected": "Expected here at this season", "seldom": "Seldom recorded here",
         "rare": "Rarely or never recorded here", "none": "No records nearby"}[
            expectation(prior["shifts"][0]["priorFactor"])])
    if size == "phone":
        no_sideways_scroll(page)

    # One tap splits them: three finds, three answers from /v1/identify, each with its
    # own EXIF place and date.
    card.locator("button.split").click()
    done = page.locator(".result[data-state=done]")
    expect(done).to_have_count(3)
    expect(page.locator(".result[data-mode=observation]")).to_have_count(0)
    singles = sent.to("v1/identify")
    assert len(singles) == 3 and len(sent.to("v1/identify-observation")) == 1
    for call in singles:
        body = json_body(call)
        assert body["location"]["latitude"] == pytest.approx(ROSCOFF[0], abs=1e-6)
        assert body["location"]["longitude"] == pytest.approx(ROSCOFF[1], abs=1e-6)
        assert body["observedOn"] == "2023-06-01"
        assert image_size(base64.b64decode(body["image"])) == (597, SHORT_SIDE)
    for i in range(3):
        expect(done.nth(i).locator("img.query")).to_have_attribute("alt", f"find-{i}.jpg")
        expect(done.nth(i).locator(".place-source")).to_have_text(
            "Position read from the photo (EXIF).")
    expect(page.locator("#notice")).to_have_text("Photos split: 3 finds, identified one by one.")


def test_photos_chosen_one_by_one_give_one_answer_each(browser: Browser, obs_server,
                                                        tmp_path) -> None:
    taken = dt.datetime(2023, 6, 1, 10, 15)
    page = new_page(browser, obs_server, "desktop")
    sent = Sent(page)
    for i in range(3):
        page.set_input_files("#pick", write(tmp_path, f"one-{i}.jpg",
                                            exif_jpeg(40 + i, ROSCOFF, taken)))
        expect(page.locator(".result[data-state=done]")).to_have_count(i + 1)
    assert [c["path"] for c in sent.calls] == ["v1/identify"] * 3
    assert all(json_body(c)["observedOn"] == "2023-06-01" for c in sent.calls)
    expect(page.locator(".result .contributions")).to_have_count(0)


def test_a_stray_photo_is_flagged_as_another_organism(browser: Browser, obs_server,
                                                       tmp_path) -> None:
    """The server's real answer, with the third photo marked as left out (as the
    combiner does when two photos agree and one does not): the page flags it."""
    files = [write(tmp_path, f"s-{i}.jpg", exif_jpeg(60 + i, ROSCOFF)) for i in range(3)]
    page = new_page(browser, obs_server, "desktop")

    def stray(route: Route) -> None:
        answer = route.fetch().json()
        photos = answer["evidence"]["photos"]
        photos[2].update(excluded=True, outlierProbability=0.93, agrees=False)
        photos[0].update(excluded=False, outlierProbability=0.02, agrees=True)
        route.fulfill(json=answer)

    page.route("**/v1/identify-observation", stray)
    page.set_input_files("#pick", files)
    card = page.locator(".result[data-state=done]").first
    expect(card.locator(".contributions li").nth(2)).to_contain_text(
        "probably another organism (93 %): left out of the combination")
    expect(card.locator(".contributions li").nth(0)).to_contain_text("agrees with the answer")
    expect(card.locator("figure.photo.other-organism")).to_have_count(1)
    expect(card.locator("figure.photo").nth(2)).to_have_class("photo other-organism")
    expect(card.locator("figure.photo").nth(2).locator(".badge")).to_have_text(
        "Another organism?")
    page.locator("#lang").click()
    expect(card.locator("figure.photo").nth(2).locator(".badge")).to_have_text(
        "Autre organisme ?")
    expect(card.locator(".contributions li").nth(2)).to_contain_text("écartée de la combinaison")


# ---------------------------------------------------------------- no EXIF, geolocation


@pytest.mark.parametrize("size", ["phone", "desktop"])
def test_photo_without_exif_refused_geolocation_then_typed_place(browser: Browser, obs_server,
                                                                  tmp_path, size) -> None:
    # No geolocation permission granted: the browser refuses (as a volunteer's "Block").
    page = new_page(browser, obs_server, size, permissions=[])
    sent = Sent(page)
    page.set_input_files("#pick", write(tmp_path, "bare.jpg", exif_jpeg(70)))
    card = page.locator(".result[data-state=done]").first
    expect(card).to_be_visible()
    call = sent.calls[0]
    assert call["path"] == "v1/identify"
    fields = dict(form_fields(call))  # no place, no date: the form, as before
    assert set(fields) == {"image", "topK", "numSimilar", "includeThumbnails"}
    expect(card.locator(".place-source")).to_contain_text("No position in the photos")
    expect(card.locator(".date-source")).to_have_text("No date in the photos.")
    expect(card.locator(".prior")).to_contain_text("No place or date")

    card.locator("button.use-position").click()
    expect(card.locator(".geo-status")).to_have_text(
        "Position not shared (refused). You can type it, or identify without a place.")
    expect(card.locator("input[name=latitude]")).to_have_value("")
    page.wait_for_timeout(300)
    assert len(sent.calls) == 1  # a refusal sends nothing

    # A bad latitude is refused on the page; a corrected one is sent.
    card.get_by_label("Latitude (degrees)").fill("95")
    card.get_by_label("Longitude (degrees)").fill("-4,1")
    card.locator("button.identify-again").click()
    expect(card.locator("input[name=latitude]")).to_have_attribute("aria-invalid", "true")
    page.wait_for_timeout(300)
    assert len(sent.calls) == 1
    card.get_by_label("Latitude (degrees)").fill("48.7")
    card.get_by_label("Date of the find").fill("2024-04-20")
    with answered(page, "/v1/identify") as got:
        card.locator("button.identify-again").click()
    body = json_body(sent.calls[-1])
    assert body["location"] == {"latitude": 48.7, "longitude": -4.1, "uncertaintyM": 0}
    assert body["observedOn"] == "2024-04-20"
    prior = got.value.json()["prior"]
    assert prior["applied"] and prior["usedLocation"] and prior["usedDate"]
    expect(card).to_have_attribute("data-state", "done")
    expect(card.locator(".place-source")).to_have_text("Position typed in.")
    expect(card.locator(".prior .prior-used")).to_contain_text("Place used: yes")
    if size == "phone":
        no_sideways_scroll(page)


def test_granted_geolocation_fills_the_place_of_an_observation(browser: Browser, obs_server,
                                                                tmp_path) -> None:
    page = new_page(browser, obs_server, "phone", permissions=["geolocation"],
                    geolocation={"latitude": 47.48, "longitude": -3.12, "accuracy": 25})
    sent = Sent(page)
    # One photo with a date but no position, one with no EXIF at all.
    files = [write(tmp_path, "dated.jpg", exif_jpeg(80, None, dt.datetime(2022, 8, 15, 9))),
             write(tmp_path, "bare.jpg", exif_jpeg(81))]
    page.set_input_files("#pick", files)
    card = page.locator(".result[data-state=done]").first
    expect(card).to_be_visible()
    first = dict((n, v) for n, v in form_fields(sent.calls[0]) if n != "image")
    assert "latitude" not in first and first["observedOn"] == "2022-08-15"
    expect(card.locator(".date-source")).to_have_text("Date read from photo 1 (EXIF).")
    with answered(page, "/v1/identify-observation"):
        card.locator("button.use-position").click()
    expect(card).to_have_attribute("data-state", "done")
    fields = dict((n, v) for n, v in form_fields(sent.calls[-1]) if n != "image")
    assert len(sent.calls) == 2 and sent.calls[-1]["path"] == "v1/identify-observation"
    assert (float(fields["latitude"]), float(fields["longitude"])) == (47.48, -3.12)
    assert float(fields["uncertainty_m"]) == 25 and fields["observedOn"] == "2022-08-15"
    expect(card.locator(".place-source")).to_have_text("Your device's position (± 25 m).")
    expect(card.locator("input[name=latitude]")).to_have_value("47.48")


# ---------------------------------------------------------------- crop


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def crop_of(data: bytes, box: tuple[float, float, float, float]) -> bytes:
    """What the page should send for a crop box: the same cut, done here with Pillow."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    x, y, bw, bh = box
    left, top = round(x * w), round(y * h)
    cut = image.crop((left, top, left + round(bw * w), top + round(bh * h)))
    out = io.BytesIO()
    cut.save(out, "JPEG", quality=90)
    return out.getvalue()


def test_keyboard_crop_changes_the_image_and_nothing_else(browser: Browser, obs_server,
                                                           tmp_path, capsys) -> None:
    original = exif_jpeg(90, ROSCOFF, dt.datetime(2023, 6, 1, 10, 15), quarters=True)
    page = new_page(browser, obs_server, "desktop")
    sent = Sent(page)
    page.set_input_files("#pick", write(tmp_path, "crab.jpg", original))
    card = page.locator(".result[data-state=done]").first
    expect(card).to_be_visible()

    # Keyboard only: open the crop, focus the box, shrink it, move it (to the bottom-right
    # quarter; it stops at the edges), apply with Enter.
    card.locator("button.crop-open").focus()
    page.keyboard.press("Enter")
    box = card.locator(".crop-box.editing")
    expect(box).to_be_focused()
    expect(box).to_have_attribute("data-crop", "0.1000,0.1000,0.8000,0.8000")
    for _ in range(15):
        page.keyboard.press("Shift+ArrowLeft")
        page.keyboard.press("Shift+ArrowUp")
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    expect(box).to_have_attribute("data-crop", "0.2000,0.1000,0.5000,0.5000")
    expect(card.locator(".crop-readout")).to_have_text(
        "Box: 50 % × 50 % of the photo, 20 % from the left edge and 10 % from the top.")
    for _ in range(20):
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowDown")
    expect(box).to_have_attribute("data-crop", "0.5000,0.5000,0.5000,0.5000")
    with answered(page, "/v1/identify"):
        page.keyboard.press("Enter")
    expect(card).to_have_attribute("data-state", "done")
    expect(card.locator(".crop-note")).to_have_text("cropped")

    full, cropped = (json_body(c) for c in sent.calls)
    # Only the image differs: the place and date read from the EXIF are kept.
    assert {k: v for k, v in full.items() if k != "image"} == \
        {k: v for k, v in cropped.items() if k != "image"}
    assert cropped["location"]["latitude"] == pytest.approx(ROSCOFF[0], abs=1e-6)
    assert cropped["observedOn"] == "2023-06-01"
    full_image, crop_image = (base64.b64decode(b["image"]) for b in (full, cropped))
    assert image_size(full_image) == (597, SHORT_SIDE)
    assert image_size(crop_image) == (400, 300)  # 50 % of 800x600, below the cap: not scaled
    assert len(crop_image) < len(full_image)

    # Measured on the demo model: the crop changes the embedding sent, and the page's cut is
    # the box asked for (its embedding matches the same cut made here).
    embed = obs_server.state.identifier.embed_images
    vectors, _, _ = embed([full_image, crop_image, crop_of(original, (0.5, 0.5, 0.5, 0.5)),
                           crop_of(original, (0.0, 0.0, 0.5, 0.5))])
    moved = cosine(vectors[0], vectors[1])
    same_cut = cosine(vectors[1], vectors[2])
    other_cut = cosine(vectors[1], vectors[3])
    with capsys.disabled():
        print(f"\ncrop on the demo model: cos(whole, cropped) = {moved:.4f}; "
              f"cos(page's crop, same crop by Pillow) = {same_cut:.4f}; "
              f"cos(page's crop, another crop) = {other_cut:.4f}")
    assert same_cut > 0.99 and moved < same_cut - 0.01 and other_cut < same_cut - 0.01

    # Identify again: the crop is remembered (same cut sent), and shown when reopened.
    with answered(page, "/v1/identify"):
        card.locator("button.identify-again").click()
    expect(card).to_have_attribute("data-state", "done")
    again = json_body(sent.calls[-1])
    assert image_size(base64.b64decode(again["image"])) == (400, 300)
    assert again["location"] == cropped["location"]
    card.locator("button.crop-open").click()
    expect(card.locator(".crop-box.editing")).to_have_attribute(
        "data-crop", "0.5000,0.5000,0.5000,0.5000")
    page.keyboard.press("Escape")
    expect(card.locator(".crop-box.editing")).to_have_count(0)
    assert len(sent.calls) == 3  # Escape cancels: nothing sent


def test_mouse_drags_the_crop_box_and_its_corner(browser: Browser, obs_server, tmp_path) -> None:
    page = new_page(browser, obs_server, "desktop")
    sent = Sent(page)
    page.set_input_files("#pick", write(tmp_path, "m.jpg",
                                        exif_jpeg(91, ROSCOFF, dt.datetime(2023, 5, 2, 8))))
    card = page.locator(".result[data-state=done]").first
    card.locator("button.crop-open").click()
    frame = card.locator(".crop-frame").bounding_box()
    w, h = frame["width"], frame["height"]
    # The south-east corner from (0.9, 0.9) to (0.6, 0.7) of the photo.
    handle = card.locator(".handle.se").bounding_box()
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(frame["x"] + 0.6 * w, frame["y"] + 0.7 * h, steps=5)
    page.mouse.up()
    x, y, bw, bh = map(float, card.locator(".crop-box").get_attribute("data-crop").split(","))
    assert (x, y) == (0.1, 0.1) and bw == pytest.approx(0.5, abs=0.02) and \
        bh == pytest.approx(0.6, abs=0.02)
    # Drag the box itself 0.2 to the right.
    page.mouse.move(frame["x"] + 0.3 * w, frame["y"] + 0.3 * h)
    page.mouse.down()
    page.mouse.move(frame["x"] + 0.5 * w, frame["y"] + 0.3 * h, steps=5)
    page.mouse.up()
    x2, y2, bw2, bh2 = map(float, card.locator(".crop-box").get_attribute("data-crop").split(","))
    assert x2 == pytest.approx(0.3, abs=0.02) and y2 == pytest.approx(0.1, abs=0.01)
    assert (bw2, bh2) == (bw, bh)
    with answered(page, "/v1/identify"):
        card.locator("button.crop-done").click()
    expect(card).to_have_attribute("data-state", "done")
    size = image_size(base64.b64decode(json_body(sent.calls[-1])["image"]))
    assert size == (round(bw * 800), round(bh * 600))
    assert json_body(sent.calls[-1])["observedOn"] == "2023-05-02"


def test_pinch_on_a_phone_shrinks_the_crop_of_one_photo_of_an_observation(
        browser: Browser, obs_server, tmp_path) -> None:
    taken = dt.datetime(2023, 6, 1, 10, 15)
    files = [write(tmp_path, f"p-{i}.jpg", exif_jpeg(95 + i, ROSCOFF, taken)) for i in range(2)]
    page = new_page(browser, obs_server, "phone")
    sent = Sent(page)
    page.set_input_files("#pick", files)
    card = page.locator(".result[data-state=done]").first
    expect(card).to_be_visible()
    card.get_by_role("button", name="Crop photo 2").click()
    box = card.locator(".crop-box.editing")
    expect(box).to_be_focused()
    frame = card.locator("figure.photo").nth(1).locator(".crop-frame").bounding_box()
    cx, cy = frame["x"] + frame["width"] / 2, frame["y"] + frame["height"] / 2
    cdp = page.context.new_cdp_session(page)

    def touch(kind: str, spread: float) -> None:
        points = [] if kind == "touchEnd" else [
            {"x": cx - spread, "y": cy, "id": 1}, {"x": cx + spread, "y": cy, "id": 2}]
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})

    touch("touchStart", 80)
    for spread in (70, 60, 50, 40):
        touch("touchMove", spread)
    touch("touchEnd", 0)
    x, _, bw, bh = map(float, box.get_attribute("data-crop").split(","))
    assert bw == pytest.approx(0.4, abs=0.03) and bh == pytest.approx(0.4, abs=0.03), (bw, bh)
    assert x + bw / 2 == pytest.approx(0.5, abs=0.03)  # pinched about its centre
    no_sideways_scroll(page)
    with answered(page, "/v1/identify-observation"):
        card.locator("button.crop-done").click()
    expect(card).to_have_attribute("data-state", "done")
    first, second = (form_fields(c) for c in sent.to("v1/identify-observation"))
    images = [[v for n, v in f if n == "image"] for f in (first, second)]
    assert images[0][0] == images[1][0]  # photo 1 untouched
    assert image_size(images[1][0]) == (597, SHORT_SIDE)
    assert image_size(images[1][1]) == (round(bw * 800), round(bh * 600))  # photo 2 cropped
    rest = [[(n, v) for n, v in f if n != "image"] for f in (first, second)]
    assert rest[0] == rest[1] and ("observedOn", "2023-06-01") in rest[1]


# ---------------------------------------------------------------- unsure answers


def _rewrite(route: Route, change) -> None:
    answer = route.fetch().json()
    change(answer)
    route.fulfill(json=answer)


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_a_genus_answer_says_so_first_with_the_species_below(browser: Browser, obs_server,
                                                             tmp_path, size) -> None:
    """The server's answer, rewritten into a genus answer (the demo model's random
    embeddings seldom give one): the page says the genus first, species below."""
    def genus(answer: dict) -> None:
        answer["decision"] = {"species": "", "confidence": 0.94, "method": "METHOD_TAXON",
                              "rank": "RANK_GENUS", "taxon": "Patella"}
        answer["classifierCandidates"] = [
            {"species": "Patella vulgata", "score": 0.61},
            {"species": "Patella caerulea", "score": 0.3},
            {"species": "Carcinus maenas", "score": 0.04}]

    page = new_page(browser, obs_server, size)
    page.route("**/v1/identify", lambda route: _rewrite(route, genus))
    page.set_input_files("#pick", write(tmp_path, "limpet.jpg", exif_jpeg(99)))
    card = page.locator(".result[data-state=done]").first
    expect(card.locator(".decision-label")).to_have_text("Species uncertain")
    expect(card.locator(".decision")).to_have_text("Genus Patella — 94 %")
    expect(card.locator(".decision .sci")).to_have_text("Patella")
    listed = card.locator(".taxon-candidates li")
    expect(listed).to_have_count(2)  # the species of the genus (from the catalog's lineage)
    expect(listed.nth(0)).to_have_text("Patella vulgata — 61 %")
    expect(listed.nth(1)).to_have_text("Patella caerulea — 30 %")
    # The order on the page: genus first, then the candidate species.
    order = card.locator(".answer").evaluate(
        "a => [a.querySelector('.decision'), a.querySelector('.taxon-candidates')]"
        ".map(n => Array.from(a.querySelectorAll('*')).indexOf(n))")
    assert order[0] < order[1]
    page.locator("#lang").click()
    expect(card.locator(".decision")).to_have_text("Genre Patella — 94 %")
    expect(card.locator(".decision-label")).to_have_text("Espèce incertaine")
    if size == "phone":
        no_sideways_scroll(page)


@pytest.mark.parametrize("size", ["phone", "desktop"])
def test_a_rejection_says_what_would_help(browser: Browser, obs_server, tmp_path, size) -> None:
    def reject(answer: dict) -> None:
        answer["decision"] = {"species": "", "confidence": 0.21, "method": "METHOD_REJECTED",
                              "rank": "RANK_UNSPECIFIED", "taxon": ""}

    page = new_page(browser, obs_server, size)
    page.route("**/v1/identify-observation", lambda route: _rewrite(route, reject))
    page.set_input_files("#pick", [write(tmp_path, f"r-{i}.jpg", exif_jpeg(100 + i))
                                   for i in range(2)])
    card = page.locator(".result[data-state=done]").first
    expect(card.locator(".decision")).to_have_text("Don't know")
    tips = card.locator(".help-tips li")
    expect(tips.nth(0)).to_contain_text("a closer photo")
    expect(tips.nth(1)).to_contain_text("another angle")
    expect(card.locator(".help-tips")).to_contain_text("the place and date of the find")
    page.locator("#lang").click()
    expect(card.locator(".decision")).to_have_text("Je ne sais pas")
    expect(tips.nth(0)).to_contain_text("une photo plus proche")
    expect(tips.nth(1)).to_contain_text("un autre angle")


# ---------------------------------------------------------------- offline


def test_the_exif_reader_is_served_by_the_service(browser: Browser, obs_server) -> None:
    page = new_page(browser, obs_server, "desktop")
    assert page.evaluate("typeof window.ExifReader.load") == "function"
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.reload()
    page.wait_for_selector("body[data-ready]")
    base = obs_server.http.url
    assert any(u == base + "static/exif-reader.js" for u in urls)
    assert all(u.startswith(base) or u.startswith("data:") for u in urls), urls
    head = page.evaluate("fetch('/static/exif-reader.js').then(r => r.text())")[:400]
    assert "MPL-2.0" in head and "exifreader" in head
