"""``biolit-id``: the one command-line entry point.

Each subcommand lives in its own module exposing ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only when their command runs,
so ``biolit-id identify`` does not pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("biolit_id.cli.serve", "run the gRPC identification service"),
    "identify": ("biolit_id.cli.identify", "identify photos with a running service"),
    "demo-model": ("biolit_id.cli.demo_model", "write a random-weight model in BioCLIP's format"),
    "embed": ("biolit_id.cli.embed", "embed a labelled photo set into a parquet file"),
    "train": ("biolit_id.cli.train", "train the head, prototypes and whitening into a bundle"),
    "calibrate": ("biolit_id.cli.calibrate", "fit routing thresholds on validation embeddings"),
    "evaluate": ("biolit_id.cli.evaluate", "evaluate a bundle and write metrics and plots"),
    "bench-quality": ("biolit_id.cli.bench_quality",
                      "measure identification quality on the synthetic long tail"),
    "import-seed": ("biolit_id.cli.import_seed", "import the BioLit seed's trained artifacts"),
    "infer-csv": ("biolit_id.cli.infer_csv", "identify a folder offline into the seed's CSV"),
    "enrich": ("biolit_id.cli.enrich", "refresh catalog taxonomy and names from GBIF"),
    "gallery": ("biolit_id.cli.gallery",
                "add, remove, list, import, export, rebuild reference photos"),
    "bench": ("biolit_id.cli.bench.command", "benchmark runtimes, the service and the gallery"),
    "check-runtime": ("biolit_id.cli.check_runtime", "compare a runtime's embeddings with fp32"),
    "protogen": ("biolit_id.cli.protogen", "regenerate the gRPC stubs from proto/"),
    "prior": ("biolit_id.cli.prior", "fit the place-and-season prior and observation combiner"),
    "export-decision": ("biolit_id.cli.export_decision", "write a bundle's decision as ONNX"),
    "export-dwca": ("biolit_id.cli.export_dwca", "write identifications as a Darwin Core Archive"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="biolit-id", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(cmd)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if module is None:
        parser.print_help()
        return 2
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
