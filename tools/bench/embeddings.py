"""``bench --sections embeddings``: identifications per second with embeddings as input
beside photos as input, on the same server, machine and run.

A device that embeds its own photos (the page's on-device path, ``/v1/models``)
sends the service 512 floats instead of a photo: the service then skips decode,
batching and the model, and only scores, decides and answers. Closed-loop gRPC
clients at one concurrency alternate between the two inputs (rounds interleaved,
so a load spike hits both); the embeddings are the service's own for the same
photos. The ratio is the headline.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence

import numpy as np

from biolit_id.cli.bench.rpc import closed_loop
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.inference.preprocess import preprocess

log = logging.getLogger(__name__)


def embeddings_of(running, photos: Sequence[bytes]) -> list[np.ndarray]:
    """The service's own embeddings of ``photos`` (what a device would send)."""
    state = running.state
    pixels = np.stack([preprocess(p, state.identifier.policy) for p in photos])
    return list(state.embedder.embed(pixels))


def bench_embeddings(running, photos: Sequence[bytes], concurrency: int = 4,
                     repeats: int = 3, photos_per_client: int = 6,
                     embeddings_per_client: int = 500) -> dict:
    """Identifications/s with photos and with their embeddings as input, interleaved."""
    vectors = embeddings_of(running, photos)
    embedding_requests = [pb.IdentifyRequest(embedding=v.astype(np.float32).tolist())
                          for v in vectors]
    photo_requests = [pb.IdentifyRequest(image=p) for p in photos]
    closed_loop(running.port, photo_requests, 1, 2)  # warm-up: connections, first batches
    closed_loop(running.port, embedding_requests, concurrency, 4 * concurrency)
    with_photos, with_embeddings = [], []
    for _ in range(repeats):
        with_photos.append(closed_loop(running.port, photo_requests, concurrency,
                                photos_per_client * concurrency))
        with_embeddings.append(closed_loop(running.port, embedding_requests, concurrency,
                                    embeddings_per_client * concurrency))
    photos_s = statistics.median(r["photos_per_s"] for r in with_photos)
    embeddings_s = statistics.median(r["photos_per_s"] for r in with_embeddings)
    result = {
        "concurrency": concurrency,
        "runtime": running.state.embedder.runtime,
        "precision": running.state.embedder.precision,
        "photo_bytes_mean": float(np.mean([len(p) for p in photos])),
        "photos_per_s": photos_s,
        "embeddings_per_s": embeddings_s,
        "ratio": embeddings_s / photos_s if photos_s else float("nan"),
        "photos_p50_ms": statistics.median(r["p50_ms"] for r in with_photos),
        "embeddings_p50_ms": statistics.median(r["p50_ms"] for r in with_embeddings),
        "errors": sum(r["error_count"] for r in with_photos + with_embeddings),
        "runs": {"photos": [r["photos_per_s"] for r in with_photos],
                 "embeddings": [r["photos_per_s"] for r in with_embeddings]},
    }
    log.info("embeddings vs photos at c=%d: %.1f vs %.2f identifications/s (%.0fx)",
             concurrency, embeddings_s, photos_s, result["ratio"])
    return result


def report_lines(result: dict | None) -> list[str]:
    if not result:
        return []
    return [f"identifications/s at c={result['concurrency']} ({result['runtime']} "
            f"{result['precision']}): photos {result['photos_per_s']:.2f}, embeddings "
            f"{result['embeddings_per_s']:.1f} -> {result['ratio']:.0f}x"]
