"""What downsizing before upload changes: bytes sent, decode cost, the answer.

Each bench photo is sent twice to the running bench server, as taken and as
our clients send it (``downsize_for_upload``); the decisions are compared, and
the embeddings of both (same runtime as the server) give the cosine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np

from biolit_id.cli.bench.common import client_channel
from biolit_id.cli.client.upload import UPLOAD_QUALITY, UPLOAD_SHORT_SIDE, downsize_for_upload
from biolit_id.proto import identification_pb2 as pb
from biolit_id.proto import identification_pb2_grpc as pb_grpc
from biolit_id.server.inference.embedders.gate import cosine_rows
from biolit_id.server.inference.preprocess import preprocess


def _decision(resp: pb.IdentifyResponse) -> tuple:
    d = resp.decision
    return (d.species, d.taxon, int(d.rank), int(d.method))


def bench_upload(running, photos: Sequence[bytes]) -> dict:
    """Agreement between original and downsized uploads on ``photos`` (synthetic here)."""
    state = running.state
    policy = state.identifier.policy
    stub = pb_grpc.SpeciesIdentifierStub(client_channel(running.port))
    started = time.perf_counter()
    small = [downsize_for_upload(p) for p in photos]
    client_ms = (time.perf_counter() - started) * 1e3 / len(photos)
    same = 0
    for original, downsized in zip(photos, small, strict=True):
        a = stub.Identify(pb.IdentifyRequest(image=original))
        b = stub.Identify(pb.IdentifyRequest(image=downsized))
        same += _decision(a) == _decision(b)
    emb_original = state.embedder.embed(np.stack([preprocess(p, policy) for p in photos]))
    emb_small = state.embedder.embed(np.stack([preprocess(p, policy) for p in small]))
    cos = cosine_rows(emb_original, emb_small)

    def decode_ms(items: Sequence[bytes]) -> float:
        times = []
        for data in items:
            t0 = time.perf_counter()
            preprocess(data, policy)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return {
        "photos": len(photos), "short_side": UPLOAD_SHORT_SIDE, "quality": UPLOAD_QUALITY,
        "same_decision": same / len(photos),
        "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
        "bytes_original_mean": float(np.mean([len(p) for p in photos])),
        "bytes_downsized_mean": float(np.mean([len(p) for p in small])),
        "client_downsize_ms_per_photo": client_ms,
        "server_decode_ms_original": decode_ms(photos),
        "server_decode_ms_downsized": decode_ms(small),
    }
