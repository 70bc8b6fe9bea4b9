"""``biolit-id infer-csv --server``: the same CSV, answered by a running service.

Each photo goes to the service's Identify call, downsized first exactly as
``biolit-id identify`` sends it (``--send-originals`` to disable), and the
answer becomes the same row the in-process mode writes. Photos the service
refuses as unreadable go to the errors file; any other failure stops the run.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from biolit_id.cli.client.channel import auth_metadata, open_channel
from biolit_id.cli.client.upload import downsize_for_upload
from biolit_id.cli.seedcompat.csv_rows import TOP_K, BatchResult, Inputs, seed_row, write_csv
from biolit_id.cli.seedcompat.formats import SEED_COLUMNS
from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from biolit_id.server.decision.seed_v2 import ROUTING as SEED_V2_ROUTING
from biolit_id.server.decision.types import Method
from biolit_id.server.grpc.messages import PB_TO_RANK

# The service's answers for a photo it cannot read: a row in the errors file.
PHOTO_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT})


class RemoteError(RuntimeError):
    """The service failed for another reason than the photo (down, auth, overload)."""


@dataclass
class RemoteAnswer:
    """An IdentifyResponse in the shape ``seed_row`` reads."""

    species: str
    confidence: float
    method: Method
    classifier_candidates: list[tuple[str, float]]
    prototype_candidates: list[tuple[str, float]]
    taxon: str
    rank: str

    @classmethod
    def of(cls, resp: pb.IdentifyResponse) -> RemoteAnswer:
        d = resp.decision
        return cls(
            species=d.species, confidence=d.confidence, method=Method(d.method),
            classifier_candidates=[(c.species, c.score) for c in resp.classifier_candidates],
            prototype_candidates=[(c.species, c.score) for c in resp.prototype_candidates],
            taxon=d.taxon, rank=PB_TO_RANK.get(d.rank, ""))


class RemoteCsvIdentifier:
    """Photos -> seed CSV rows, through a running service's Identify calls."""

    v2 = False  # a seed-v2 service is refused in ``run_remote``

    def __init__(self, stub: pb_grpc.SpeciesIdentifierStub, metadata: list[tuple[str, str]],
                 timeout: float, send_originals: bool = False, workers: int = 2) -> None:
        self.stub = stub
        self.metadata = metadata
        self.timeout = timeout
        self.send_originals = send_originals
        # Concurrent calls: the service's batcher puts them in one model batch.
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="upload")

    @property
    def columns(self) -> list[str]:
        return list(SEED_COLUMNS)

    def close(self) -> None:
        self._pool.shutdown()

    def _ask(self, path: Path) -> RemoteAnswer | str:
        """The service's answer, or why the photo cannot be identified."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            return exc.strerror or type(exc).__name__
        image = data if self.send_originals else downsize_for_upload(data)
        try:
            resp = self.stub.Identify(pb.IdentifyRequest(image=image, top_k=TOP_K),
                                      timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            if exc.code() in PHOTO_ERRORS:
                return exc.details() or exc.code().name
            raise RemoteError(f"{path.name}: {exc.code().name}: {exc.details()}") from None
        return RemoteAnswer.of(resp)

    def identify(self, paths: list[Path], names: list[str]) -> BatchResult:
        answers = list(self._pool.map(self._ask, paths))
        rows, errors = [], []
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, str):
                errors.append((name, answer))
            else:
                rows.append(seed_row(name, answer))
        return BatchResult(rows, errors)


def run_remote(args: argparse.Namespace, items: Inputs) -> int:
    """``infer-csv --server``: exit 0 when every photo got an answer or an error row."""
    if items.paths is None:
        print("infer-csv: --server sends photos; --embeddings runs in-process only")
        return 1
    if args.taxonomy:
        print("infer-csv: --taxonomy needs the scores in-process; drop --server or --taxonomy")
        return 1
    metadata = auth_metadata(args.api_key)
    with open_channel(args.server, args.tls_ca) as channel:
        stub = pb_grpc.SpeciesIdentifierStub(channel)
        try:
            info = stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=args.timeout,
                                       metadata=metadata)
        except grpc.RpcError as exc:
            print(f"infer-csv: {args.server}: {exc.code().name}: {exc.details()}")
            return 1
        if info.mode == SEED_V2_ROUTING:
            print("infer-csv: the service runs a seed-v2 bundle, whose CSV needs the "
                  "bundle's names; run infer-csv in-process with --bundle")
            return 1
        print(f"infer-csv: {args.server} ({info.model_id}, {info.mode}, "
              f"{info.runtime} {info.precision})", file=sys.stderr)
        worker = RemoteCsvIdentifier(stub, metadata, args.timeout, args.send_originals,
                                     args.workers)
        try:
            return write_csv(args, worker, items)
        except RemoteError as exc:
            print(f"infer-csv: {exc}")
            return 1
