"""Hostile and unusual photos: bombs, junk, truncation, odd formats and colour modes.

Property-based (hypothesis) over the decoder and the request validation, then
the same inputs over real gRPC: every one must map to OK or INVALID_ARGUMENT
with a message, and the service must stay healthy.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from biolit_id.index.core.errors import InvalidRequestError
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.grpc.limits import RequestLimitError, check_request
from biolit_id.server.inference.preprocess import (
    ImageDecodeError,
    ImagePolicy,
    open_image,
    preprocess,
)
from conftest import photo_bytes, stub_for

pytestmark = [
    # PIL warns about the corrupt data these tests feed it on purpose.
    pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning"),
    pytest.mark.filterwarnings("ignore:Truncated File Read:UserWarning"),
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

POLICY = ImagePolicy()
# BIOLIT_FUZZ_EXAMPLES=5000 pytest tests/test_hostile_input.py fuzzes deeper on demand.
EXAMPLES = int(os.environ.get("BIOLIT_FUZZ_EXAMPLES", "100"))
FUZZ = settings(deadline=None, max_examples=EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def centre(img: Image.Image) -> tuple[int, ...]:
    return img.getpixel((img.width // 2, img.height // 2))


def close(actual, expected, tol: int = 0) -> bool:
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected, strict=True))


# -------------------------------------------------------------- crafted files


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png(width: int, height: int, raw_rows: bytes, bit_depth: int = 8, colour: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(raw_rows, 9)) + png_chunk(b"IEND", b""))


def png_bomb(width: int, height: int) -> bytes:
    """A few hundred bytes declaring width x height RGB pixels (only one row of data)."""
    return png(width, height, b"\x00" * (1 + 3 * min(width, 1000)))


def gif_bomb(width: int, height: int) -> bytes:
    base = bytearray(encode(Image.new("P", (2, 2)), "GIF"))
    base[6:10] = struct.pack("<HH", width, height)  # logical screen
    at = base.index(b"\x2c")  # image descriptor
    base[at + 5:at + 9] = struct.pack("<HH", width, height)
    return bytes(base)


def jpeg_bomb(width: int, height: int) -> bytes:
    base = bytearray(encode(Image.new("RGB", (16, 16), (10, 200, 30)), "JPEG"))
    at = base.index(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    base[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(base)


def bmp_bomb(width: int, height: int) -> bytes:
    base = bytearray(encode(Image.new("RGB", (4, 4)), "BMP"))
    base[18:26] = struct.pack("<ii", width, height)
    return bytes(base)


BOMBS = {
    "png-40000x40000": png_bomb(40000, 40000),
    "png-9000x9000": png_bomb(9000, 9000),  # under PIL's own guard, over our budget
    "gif-65535x65535": gif_bomb(65535, 65535),
    "jpeg-60000x60000": jpeg_bomb(60000, 60000),
    "bmp-30000x30000": bmp_bomb(30000, 30000),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decompression_bombs_are_refused_from_the_header(name: str) -> None:
    data = BOMBS[name]
    assert len(data) < 2000  # tiny files ...
    with pytest.raises(ImageDecodeError) as info:
        open_image(data, POLICY)  # ... that would need gigabytes if decoded
    message = str(info.value)
    assert "budget" in message
    assert "before decoding" in message


def test_pixel_budget_is_the_configured_one() -> None:
    data = encode(Image.new("RGB", (300, 200), (1, 2, 3)), "PNG")
    assert open_image(data, ImagePolicy(max_pixels=60_000)).size == (300, 200)
    with pytest.raises(ImageDecodeError, match=r"300x200 = 60000 pixels, over the 59999"):
        open_image(data, ImagePolicy(max_pixels=59_999))


UNSUPPORTED = {
    "ico": encode(Image.new("RGB", (32, 32), "red"), "ICO"),
    "pcx": encode(Image.new("RGB", (8, 8), "red"), "PCX"),
    "tga": encode(Image.new("RGB", (8, 8), "red"), "TGA"),
    "ppm": encode(Image.new("RGB", (8, 8), "red"), "PPM"),
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
    "text": b"definitely not a photo",
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_formats_are_refused_clearly(name: str) -> None:
    with pytest.raises(ImageDecodeError, match="not a supported image"):
        preprocess(UNSUPPORTED[name], POLICY)


# ---------------------------------------------------------- multi-frame


RED, BLUE, GREEN = (220, 20, 30), (20, 30, 220), (30, 200, 40)


def frames(*colours) -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), c) for c in colours]


@pytest.mark.parametrize("fmt,kwargs,tol", [
    ("GIF", {}, 8),
    ("WEBP", {"lossless": True}, 2),
    ("TIFF", {}, 0),
    ("PNG", {}, 0),  # APNG
])
def test_multi_frame_images_use_their_first_frame(fmt: str, kwargs: dict, tol: int) -> None:
    first, *rest = frames(RED, BLUE, GREEN)
    data = encode(first, fmt, save_all=True, append_images=rest, **kwargs)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    img = open_image(data, POLICY)
    assert img.mode == "RGB"
    assert close(centre(img), RED, tol), centre(img)


# ------------------------------------------------------------- colour modes


def test_cmyk_jpeg_and_tiff_convert_to_the_right_rgb() -> None:
    for cmyk, rgb in [((0, 255, 255, 0), (255, 0, 0)), ((255, 0, 255, 0), (0, 255, 0)),
                      ((0, 0, 0, 255), (0, 0, 0)), ((0, 0, 0, 0), (255, 255, 255))]:
        img = Image.new("CMYK", (16, 16), cmyk)
        assert close(centre(open_image(encode(img, "TIFF"), POLICY)), rgb), cmyk
        assert close(centre(open_image(encode(img, "JPEG", quality=95), POLICY)), rgb, 6), cmyk


def test_16_bit_greyscale_keeps_its_brightness() -> None:
    for value in (30000, 1000, 65535, 0):  # 1000/65535 is dim and must stay dim
        arr = np.full((12, 10), value, dtype=np.uint16)
        for fmt in ("PNG", "TIFF"):
            img = open_image(encode(Image.fromarray(arr), fmt), POLICY)
            expected = round(value / 257)
            assert close(centre(img), (expected,) * 3, 1), (fmt, value, centre(img))


def test_16_bit_rgb_png_converts_to_8_bit() -> None:
    width, height = 6, 4
    pixel = struct.pack(">HHH", 65535, 32896, 0)
    rows = b"".join(b"\x00" + pixel * width for _ in range(height))
    img = open_image(png(width, height, rows, bit_depth=16, colour=2), POLICY)
    assert close(centre(img), (255, 128, 0), 1), centre(img)


def test_palette_with_and_without_transparency() -> None:
    pal = Image.new("P", (20, 10), 0)
    pal.putpalette([200, 100, 50] + [0, 0, 0] * 255)
    assert centre(open_image(encode(pal, "PNG"), POLICY)) == (200, 100, 50)
    pal.putpixel((10, 5), 1)
    transparent = encode(pal, "PNG", transparency=1)  # index 1 is see-through
    img = open_image(transparent, POLICY)
    assert centre(img) == (255, 255, 255)  # composited on white
    assert img.getpixel((0, 0)) == (200, 100, 50)
    assert close(centre(open_image(encode(pal, "GIF", transparency=1), POLICY)),
                 (255, 255, 255))


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 255, 0, 0))  # invisible green
    rgba.putpixel((9, 9), (0, 0, 0, 128))  # half-transparent black
    for fmt in ("PNG", "WEBP", "TIFF"):
        kwargs = {"lossless": True} if fmt == "WEBP" else {}
        img = open_image(encode(rgba, fmt, **kwargs), POLICY)
        assert img.mode == "RGB"
        assert close(img.getpixel((5, 5)), (255, 0, 0), 1), fmt
        assert close(img.getpixel((0, 0)), (255, 255, 255), 1), fmt
        assert close(img.getpixel((9, 9)), (127, 127, 127), 2), fmt
    la = Image.new("LA", (4, 4), (0, 0))  # fully transparent grey
    assert centre(open_image(encode(la, "PNG"), POLICY)) == (255, 255, 255)


def test_bilevel_and_greyscale() -> None:
    assert centre(open_image(encode(Image.new("1", (8, 8), 1), "PNG"), POLICY)) == (255,) * 3
    assert centre(open_image(encode(Image.new("L", (8, 8), 77), "PNG"), POLICY)) == (77,) * 3


# ------------------------------------------------------- property-based


def valid_images() -> dict[str, bytes]:
    return {
        "jpeg": photo_bytes(11, "JPEG", (96, 64)),
        "jpeg-progressive": encode(Image.open(io.BytesIO(photo_bytes(12, "JPEG", (96, 64)))),
                                   "JPEG", progressive=True),
        "png": photo_bytes(13, "PNG", (64, 48)),
        "gif": photo_bytes(14, "GIF", (64, 48)),
        "webp": photo_bytes(15, "WEBP", (64, 48)),
        "bmp": photo_bytes(16, "BMP", (32, 24)),
        "tiff": photo_bytes(17, "TIFF", (32, 24)),
    }


VALID = valid_images()
MAGICS = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
          b"BM", b"II*\x00", b"MM\x00*"]


def decodes_or_refuses(data: bytes) -> None:
    try:
        pixels = preprocess(data, POLICY)
    except ImageDecodeError as exc:
        assert str(exc)  # a message, whatever went wrong
        return
    assert pixels.shape == (3, POLICY.image_size, POLICY.image_size)
    assert np.isfinite(pixels).all()


@FUZZ
@given(st.one_of(st.binary(max_size=4096),
                 st.builds(lambda m, rest: m + rest, st.sampled_from(MAGICS),
                           st.binary(max_size=2048))))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    decodes_or_refuses(data)


@FUZZ
@given(st.sampled_from(sorted(VALID)), st.floats(0, 1, exclude_max=True))
def test_truncated_images_never_crash_the_decoder(kind: str, fraction: float) -> None:
    data = VALID[kind]
    decodes_or_refuses(data[: int(len(data) * fraction)])


@FUZZ
@given(st.sampled_from(sorted(VALID)),
       st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                min_size=1, max_size=12))
def test_corrupted_images_never_crash_the_decoder(kind: str, edits) -> None:
    data = bytearray(VALID[kind])
    for where, value in edits:
        data[int(where * len(data))] = value
    decodes_or_refuses(bytes(data))


EMBEDDING_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@FUZZ
@given(st.one_of(st.lists(EMBEDDING_FLOATS, max_size=700),
                 st.integers(0, 2).map(lambda _: [0.0] * 512),
                 st.lists(EMBEDDING_FLOATS, min_size=512, max_size=512)))
def test_random_embeddings_are_unit_rows_or_refused(identifier, values) -> None:
    try:
        vec = identifier.check_embedding(values)
    except InvalidRequestError as exc:
        assert str(exc)
        return
    assert vec.shape == (identifier.embedding_dim,)
    assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-3


TEXT = st.text(max_size=260)


@FUZZ
@given(st.builds(
    pb.IdentifyRequest,
    restrict_to=st.lists(TEXT, max_size=4),
    request_id=st.text(max_size=2100),
    top_k=st.integers(-(2**31), 2**31 - 1),
    num_similar=st.integers(-(2**31), 2**31 - 1),
))
def test_request_validation_accepts_or_names_the_problem(identifier, request) -> None:
    try:
        check_request(request)
        identifier.options(request.top_k, request.num_similar, list(request.restrict_to))
    except (RequestLimitError, InvalidRequestError) as exc:
        assert str(exc)


# ------------------------------------------------------------ over gRPC


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, demo_model_spec: str):
    from biolit_id.server.app import start_server
    from biolit_id.server.config import ServerConfig

    config = ServerConfig(model=demo_model_spec, data_dir=tmp_path_factory.mktemp("data"),
                          port=0, grace_seconds=0.5)
    running = start_server(config)
    yield running
    running.stop(0.5)


@pytest.fixture(scope="module")
def identifier(fuzz_server):
    return fuzz_server.state.identifier


@pytest.fixture(scope="module")
def fuzz_stub(fuzz_server):
    return stub_for(fuzz_server)


def healthy(running) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def answer_code(stub, request: pb.IdentifyRequest) -> tuple[grpc.StatusCode, str]:
    try:
        stub.Identify(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_bombs_and_unsupported_formats_over_grpc(fuzz_server, fuzz_stub) -> None:
    for name, data in {**BOMBS, **UNSUPPORTED}.items():
        code, details = answer_code(fuzz_stub, pb.IdentifyRequest(image=data))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert details, name
    assert healthy(fuzz_server)
    assert answer_code(fuzz_stub, pb.IdentifyRequest(image=VALID["jpeg"]))[0] == \
        grpc.StatusCode.OK


GRPC_FUZZ = settings(deadline=None, max_examples=max(25, EXAMPLES // 4), database=None,
                     suppress_health_check=[HealthCheck.too_slow])

HOSTILE_IMAGE = st.one_of(
    st.binary(min_size=1, max_size=2048),
    st.builds(lambda kind, f: VALID[kind][: max(1, int(len(VALID[kind]) * f))],
              st.sampled_from(sorted(VALID)), st.floats(0, 1, exclude_max=True)),
    st.sampled_from(sorted(VALID)).map(VALID.get),
)


@GRPC_FUZZ
@given(st.one_of(
    st.builds(pb.IdentifyRequest, image=HOSTILE_IMAGE, top_k=st.integers(-5, 2000),
              restrict_to=st.lists(st.sampled_from(["Fucus", "Gastropoda", "Nope", ""]),
                                   max_size=2)),
    st.builds(pb.IdentifyRequest,
              embedding=st.lists(EMBEDDING_FLOATS, min_size=0, max_size=600)),
    st.builds(pb.IdentifyRequest, image=HOSTILE_IMAGE,
              embedding=st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=4)),
))
def test_hostile_requests_over_grpc_are_ok_or_invalid(fuzz_stub, request) -> None:
    code, details = answer_code(fuzz_stub, request)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
    if code != grpc.StatusCode.OK:
        assert details


def test_service_is_healthy_after_the_fuzzing(fuzz_server, fuzz_stub) -> None:
    assert healthy(fuzz_server)
    reply = fuzz_stub.Identify(pb.IdentifyRequest(image=VALID["png"]), timeout=30)
    assert reply.decision.method != pb.METHOD_UNSPECIFIED
