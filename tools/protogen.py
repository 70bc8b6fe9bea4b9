"""Regenerate the Python gRPC stubs from ``proto/`` (``biolit-id protogen``).

The stubs are committed so that installing the service never needs
grpcio-tools; ``tests/test_proto_stubs.py`` regenerates them into a temporary
folder and fails when the committed copies differ. protoc writes absolute
imports (``from biolit.v1 import ...``); they are made relative so that the
stubs live inside ``biolit_id.proto`` and claim no top-level name.
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILES = ("biolit/v1/identification.proto",)
_ABSOLUTE_IMPORT = re.compile(r"^from biolit\.v1 import ", re.MULTILINE)


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the files it wrote."""
    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTO_FILES:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    written = sorted(p for p in out_dir.rglob("*_pb2*.py*") if p.is_file())
    for path in written:
        text = path.read_text()
        path.write_text(_ABSOLUTE_IMPORT.sub("from . import ", text))
    return written


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=PROTO_ROOT,
                        help="output folder (default: next to the .proto files)")


def run(args) -> int:
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import argparse

    _parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
