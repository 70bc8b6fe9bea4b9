"""Vector maths shared by training, scoring and the gallery, so all three agree.

Prototypes are similarity-weighted means: an odd photo (a crab half out of
frame, a wrong label) pulls less than a clean one, in the spirit of the
similarity-weighted prototypes of arXiv:2110.11553.
"""

from __future__ import annotations

import numpy as np

DEFAULT_SHARPNESS = 10.0  # softmax scale on cosines: 0.1 less similar -> weight x e^-1
SEED_ITERATIONS = 2  # the seed's refinements; 0 is the plain class mean


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit rows in float32 (embeddings, scores)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def l2_normalize64(x: np.ndarray) -> np.ndarray:
    """Unit rows in float64: prototypes are averaged and re-normalised several times,
    and float32 would round each step."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def weighted_prototype(
    vectors: np.ndarray, iterations: int = SEED_ITERATIONS, sharpness: float = DEFAULT_SHARPNESS
) -> np.ndarray:
    """Unit-norm prototype of ``vectors`` [N, D] (rows normalised first).

    Starts from the plain mean; each refinement reweights the rows by
    ``softmax(sharpness * cos(row, prototype))``. ``iterations=0`` is the
    plain normalised mean; one row is its own prototype.
    """
    x = l2_normalize64(vectors)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError("weighted_prototype needs a non-empty [N, D] array")
    proto = l2_normalize64(x.mean(axis=0))
    for _ in range(max(0, iterations)):
        sims = x @ proto
        weights = np.exp(sharpness * (sims - sims.max()))
        proto = l2_normalize64((weights / weights.sum()) @ x)
    return proto.astype(np.float32)


def class_prototypes(
    vectors: np.ndarray, labels: np.ndarray, num_classes: int,
    iterations: int = SEED_ITERATIONS
) -> np.ndarray:
    """[num_classes, D] prototypes; a class without vectors gets a zero row."""
    vectors = np.asarray(vectors)
    labels = np.asarray(labels)
    out = np.zeros((num_classes, vectors.shape[1]), dtype=np.float32)
    for c in range(num_classes):
        rows = vectors[labels == c]
        if len(rows):
            out[c] = weighted_prototype(rows, iterations)
    return out


def fuse_prototypes(visual: np.ndarray, text: np.ndarray, alpha: float) -> np.ndarray:
    """Proto-CLIP fusion: normalize(alpha * visual + (1 - alpha) * text), row-wise."""
    fused = alpha * np.asarray(visual, np.float32) + (1.0 - alpha) * np.asarray(text, np.float32)
    return l2_normalize(fused, axis=1)
