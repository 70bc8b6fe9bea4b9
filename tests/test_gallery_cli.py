"""``biolit-id gallery ...`` and the contact sheet, against a real server."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image
from test_gallery import species_photo

from biolit_id.cli.client.contact_sheet import PAD, TILE, render_contact_sheet
from biolit_id.cli.main import main
from biolit_id.proto import identification_pb2 as pb
from conftest import stub_for


def write_photos(folder: Path, family: int, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"f{family}-{i}.jpg"
        path.write_bytes(species_photo(family, i))
        paths.append(path)
    return paths


def test_gallery_commands_and_resumable_import(make_server, tmp_path: Path, capsys) -> None:
    running = make_server()
    server = ["gallery", "--server", f"127.0.0.1:{running.port}"]
    assert main([*server, "add-species", "Nudibranchus imaginarius", "--taxon",
                 "genus=Nudibranchus", "--vernacular", "fr:Limace imaginaire"]) == 0
    photos = write_photos(tmp_path / "photos", 20, 2)
    assert main([*server, "add", "--species", "Nudibranchus imaginarius",
                 "--license", "CC0", *map(str, photos)]) == 0
    capsys.readouterr()

    # A manifest: two new photos, one already stored, one not an image, one missing file.
    new = write_photos(tmp_path / "photos", 21, 2)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "species", "license", "contributor"])
        writer.writerow([f"photos/{new[0].name}", "Carcinus maenas", "CC-BY", "ana"])
        writer.writerow([f"photos/{photos[0].name}", "Nudibranchus imaginarius", "", ""])
        writer.writerow(["photos/broken.jpg", "Carcinus maenas", "", ""])
        writer.writerow(["photos/absent.jpg", "Carcinus maenas", "", ""])
        writer.writerow([f"photos/{new[1].name}", "Carcinus maenas", "CC-BY", "ana"])
    assert main([*server, "import", str(manifest), "--batch-size", "8", "--no-progress"]) == 1
    out = capsys.readouterr()
    assert "added 2, already stored 1, failed 2" in out.out
    with open(tmp_path / "manifest.failed.csv") as f:
        failed = list(csv.DictReader(f))
    assert [row["line"] for row in failed] == ["4", "5"]
    assert "INVALID_ARGUMENT" in failed[0]["error"] and "cannot read" in failed[1]["error"]

    # Re-running (resume) sends nothing already stored.
    stub = stub_for(running)
    version = stub.GetServiceInfo(pb.GetServiceInfoRequest()).versions.gallery_version
    assert main([*server, "import", str(manifest), "--no-progress"]) == 1
    assert "added 0, already stored 3, failed 2" in capsys.readouterr().out
    assert stub.GetServiceInfo(pb.GetServiceInfoRequest()).versions.gallery_version == version

    assert main([*server, "list", "--json", "--species", "Carcinus maenas"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["contributor"] for e in listed] == ["ana", "ana"]
    assert listed[0]["license"] == "CC-BY" and len(listed[0]["content_sha256"]) == 64

    assert main([*server, "remove", str(listed[0]["exemplar_id"])]) == 0
    capsys.readouterr()
    assert main([*server, "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + 3 and table[0].startswith("id\t")
    assert main([*server, "remove", "999999"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main([*server, "add", "--species", "Nonexistus fictus", str(photos[0])]) == 1
    assert "AddSpecies" in capsys.readouterr().err

    # identify --similar --sheet draws the query and its references.
    query = write_photos(tmp_path / "query", 20, 1, start=50)[0]
    sheet = tmp_path / "sheet.png"
    assert main(["identify", "--server", f"127.0.0.1:{running.port}", str(query),
                 "--similar", "3", "--sheet", str(sheet)]) == 0
    assert "Nudibranchus imaginarius" in capsys.readouterr().out
    img = Image.open(sheet)
    assert img.width == PAD + 4 * (TILE + PAD)
    pixels = np.asarray(img.convert("RGB"), dtype=np.float64)
    first_ref = pixels[40:40 + TILE, PAD + TILE + PAD:PAD + 2 * TILE + PAD]
    assert first_ref.std() > 5  # a photo was drawn there, not the empty background


def test_contact_sheet_without_thumbnails(tmp_path: Path) -> None:
    resp = pb.IdentifyResponse(
        decision=pb.Decision(species="Carcinus maenas", confidence=0.91,
                             method=pb.METHOD_ZERO_SHOT),
        similar=[pb.SimilarExemplar(exemplar_id=i, species="Carcinus maenas", score=0.9)
                 for i in range(7)],
    )
    out = render_contact_sheet(species_photo(30, 0), resp, tmp_path / "sub" / "s.png")
    img = Image.open(out)
    assert img.format == "PNG"
    assert img.width == PAD + 6 * (TILE + PAD)  # 5 columns of references + the query
    assert img.height > 2 * TILE  # 7 references need two rows
    empty = render_contact_sheet(b"", pb.IdentifyResponse(), tmp_path / "empty.png")
    assert Image.open(empty).width == PAD + 2 * (TILE + PAD)
