"""A contact sheet: the query photo next to its most similar reference photos.

``biolit-id identify PHOTO --similar 5 --sheet out.png`` writes one, so a
curator can see at a glance WHY the service answered what it did: if the
nearest references are of another species, the gallery (or the photo) needs
attention. The query tile carries the decision; each reference tile its
species, cosine score and exemplar id. References stored without a
thumbnail (added as embeddings) get a grey placeholder.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from biolit_id.proto import identification_pb2 as pb

TILE = 192
LABEL_HEIGHT = 46
PAD = 10
HEADER = 34
MAX_COLUMNS = 5
BACKGROUND = (248, 248, 246)
TILE_BACKGROUND = (228, 228, 224)
QUERY_BORDER = (31, 119, 180)
TEXT = (20, 20, 20)
MUTED = (95, 95, 95)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _tile(data: bytes) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE), TILE_BACKGROUND)
    if not data:
        draw = ImageDraw.Draw(tile)
        draw.text((TILE // 2, TILE // 2), "no thumbnail", fill=MUTED, font=_font(13),
                  anchor="mm")
        return tile
    try:
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    except Exception:  # a broken thumbnail must not lose the whole sheet
        return _tile(b"")
    img = ImageOps.contain(img, (TILE, TILE))
    tile.paste(img, ((TILE - img.width) // 2, (TILE - img.height) // 2))
    return tile


def _decision_text(resp: pb.IdentifyResponse) -> str:
    d = resp.decision
    method = pb.Method.Name(d.method).removeprefix("METHOD_").lower().replace("_", "-")
    answer = d.species or d.taxon or "not identified"
    return f"{answer}  ({d.confidence:.2f}, {method})"


def render_contact_sheet(query_bytes: bytes, resp: pb.IdentifyResponse, out_png: Path) -> Path:
    """Write the sheet as PNG; returns its path."""
    similar = list(resp.similar)
    columns = max(1, min(MAX_COLUMNS, len(similar)))
    rows = max(1, math.ceil(len(similar) / columns))
    cell_w, cell_h = TILE + PAD, TILE + LABEL_HEIGHT + PAD
    width = PAD + (columns + 1) * cell_w
    height = HEADER + rows * cell_h + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    title, small = _font(16), _font(12)
    draw.text((PAD, PAD), _fit(draw, "Answer: " + _decision_text(resp), title, width - 2 * PAD),
              fill=TEXT, font=title)

    x, y = PAD, HEADER
    sheet.paste(_tile(query_bytes), (x, y))
    draw.rectangle((x - 2, y - 2, x + TILE + 1, y + TILE + 1), outline=QUERY_BORDER, width=3)
    draw.text((x, y + TILE + 4), "query", fill=QUERY_BORDER, font=title)

    if not similar:
        draw.text((PAD + cell_w, HEADER + TILE // 2), "no similar reference photos",
                  fill=MUTED, font=title)
    for i, hit in enumerate(similar):
        col, row = i % columns, i // columns
        x = PAD + (col + 1) * cell_w
        y = HEADER + row * cell_h
        sheet.paste(_tile(hit.thumbnail), (x, y))
        draw.text((x, y + TILE + 3), _fit(draw, hit.species, small, TILE), fill=TEXT,
                  font=small)
        draw.text((x, y + TILE + 19), f"score {hit.score:.3f}   #{hit.exemplar_id}",
                  fill=MUTED, font=small)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, format="PNG")
    return out_png
