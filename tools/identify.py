"""``biolit-id identify PHOTO...``: ask a running service, print a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from biolit_id.cli.client.channel import auth_metadata, open_channel
from biolit_id.cli.client.upload import UPLOAD_QUALITY, UPLOAD_SHORT_SIDE, downsize_for_upload
from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photos", nargs="+", type=Path)
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    parser.add_argument("--json", action="store_true", help="print JSON, one object per photo")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--similar", type=int, default=0, help="nearest reference photos")
    parser.add_argument("--sheet", type=Path, help="write a contact sheet PNG (with --similar)")
    parser.add_argument("--restrict-to", nargs="*", default=[], help="species or taxa")
    parser.add_argument("--api-key", help="sent as 'authorization: Bearer KEY'")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate for a TLS server")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--send-originals", action="store_true",
                        help=f"send photos as they are (default: downsized to a short side of "
                             f"{UPLOAD_SHORT_SIDE} px, JPEG quality {UPLOAD_QUALITY})")


def method_name(value: int) -> str:
    return pb.Method.Name(value).removeprefix("METHOD_").lower().replace("_", "-")


def format_table(photo: Path, resp: pb.IdentifyResponse) -> str:
    d = resp.decision
    answer = d.species or (f"{d.taxon} ({pb.Rank.Name(d.rank)[5:].lower()})" if d.taxon else "?")
    lines = [
        f"{photo}",
        f"  answer      {answer}",
        f"  confidence  {d.confidence:.3f}",
        f"  method      {method_name(d.method)}",
    ]
    names = [v.name for v in resp.taxonomy.vernacular_names if v.language in ("fr", "en")]
    if names:
        lines.append(f"  names       {', '.join(names[:3])}")
    if resp.taxonomy.lineage:
        lines.append("  taxonomy    " + " > ".join(t.name for t in resp.taxonomy.lineage))
    for title, cands in (("classifier", resp.classifier_candidates),
                         ("prototypes", resp.prototype_candidates)):
        if cands:
            lines.append(f"  {title:<11} " + "; ".join(f"{c.species} {c.score:.3f}" for c in cands))
    for s in resp.similar:
        lines.append(f"  similar     #{s.exemplar_id} {s.species} ({s.score:.3f}) {s.source_uri}")
    t = resp.timing
    lines.append(f"  timing      decode {t.decode_ms:.1f} ms, queue {t.queue_ms:.1f} ms, "
                 f"embed {t.embed_ms:.1f} ms, score {t.score_ms:.1f} ms")
    return "\n".join(lines)


def sheet_path(sheet: Path, photo: Path, n_photos: int) -> Path:
    """``out.png`` for one photo; ``out-<photo>.png`` each when there are several."""
    if n_photos == 1:
        return sheet
    return sheet.with_name(f"{sheet.stem}-{photo.stem}{sheet.suffix or '.png'}")


def run(args: argparse.Namespace) -> int:
    metadata = auth_metadata(args.api_key)
    status = 0
    with open_channel(args.server, args.tls_ca) as channel:
        stub = pb_grpc.SpeciesIdentifierStub(channel)
        for photo in args.photos:
            try:
                data = photo.read_bytes()
            except OSError as exc:
                print(f"{photo}: cannot read: {exc.strerror or exc}", file=sys.stderr)
                status = 1
                continue
            request = pb.IdentifyRequest(
                image=data if args.send_originals else downsize_for_upload(data),
                top_k=args.top_k,
                num_similar=args.similar,
                restrict_to=args.restrict_to,
                include_thumbnails=bool(args.sheet),
            )
            try:
                resp = stub.Identify(request, timeout=args.timeout, metadata=metadata)
            except grpc.RpcError as exc:
                print(f"{photo}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                status = 1
                continue
            if args.json:
                out = json_format.MessageToDict(resp, preserving_proto_field_name=True)
                for s in out.get("similar", []):
                    s.pop("thumbnail", None)
                print(json.dumps({"photo": str(photo), **out}, ensure_ascii=False))
            else:
                print(format_table(photo, resp))
            if args.sheet:
                from biolit_id.cli.client.contact_sheet import render_contact_sheet

                sheet = sheet_path(args.sheet, photo, len(args.photos))
                render_contact_sheet(data, resp, sheet)
                print(f"  sheet       {sheet}")
    return status
