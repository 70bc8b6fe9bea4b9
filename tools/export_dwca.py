"""``biolit-id export-dwca``: a Darwin Core Archive of machine identifications.

From a CSV written by ``biolit-id infer-csv --format dwc`` (``--csv``), or
from a folder of photos identified on the way (``--images``, with infer-csv's
``--bundle``, ``--model``, ``--data-dir``... passed after ``--``). The zip holds
``occurrence.txt`` (the core), ``meta.xml`` and ``eml.xml``; photos the
service could not identify at any rank are left out and counted.
docs/darwin-core.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from biolit_id.cli.darwin_core.archive import (
    DEFAULT_LICENSE,
    ArchiveError,
    Metadata,
    read_rows,
    write_archive,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="a CSV from `infer-csv --format dwc`")
    source.add_argument("--images", type=Path,
                        help="a folder of photos: identified first, as `infer-csv --format "
                             "dwc` does (its options after `--`, e.g. -- --bundle B)")
    parser.add_argument("--output", type=Path, required=True, help="the archive (.zip)")
    parser.add_argument("--title", default=Metadata.title, help="dataset title (eml.xml)")
    parser.add_argument("--publisher", default=Metadata.publisher,
                        help="organisation that publishes the data set (eml.xml)")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help="licence IRI (eml.xml)")
    parser.add_argument("--id-prefix", default="",
                        help="prepended to each occurrenceID (the photo's path), e.g. "
                             "'https://biolit.fr/photos/' to make them global")
    parser.add_argument("infer_csv", nargs=argparse.REMAINDER,
                        help="with --images: infer-csv options, after --")


def _identify(args: argparse.Namespace, csv_path: Path) -> int:
    from biolit_id.cli import infer_csv

    parser = argparse.ArgumentParser(prog="biolit-id export-dwca --images DIR --")
    infer_csv.add_arguments(parser)
    extra = [a for a in args.infer_csv if a != "--"]
    infer_args = parser.parse_args(["--images", str(args.images), "--output", str(csv_path),
                                    "--format", "dwc", *extra])
    return infer_csv.run(infer_args)


def run(args: argparse.Namespace) -> int:
    if args.infer_csv and args.csv is not None:
        print("export-dwca: infer-csv options go with --images, not --csv")
        return 2
    meta = Metadata(title=args.title, publisher=args.publisher, license=args.license)
    with tempfile.TemporaryDirectory(prefix="export-dwca-") as tmp:
        csv_path = args.csv
        if args.images is not None:
            csv_path = Path(tmp) / "identifications.csv"
            code = _identify(args, csv_path)
            if code:
                return code
        try:
            written = write_archive(read_rows(csv_path), args.output, meta, args.id_prefix)
        except (ArchiveError, OSError) as exc:
            print(f"export-dwca: {exc}")
            return 1
    print(f"{written.occurrences} occurrences -> {written.path}")
    if written.left_out:
        print(f"{written.left_out} photos not identified at any rank, left out "
              "(docs/darwin-core.md)")
    return 0
