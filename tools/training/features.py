"""What every decision family is fitted on: the whitening, the common species, the prompts."""

from __future__ import annotations

import numpy as np

from biolit_id.server.catalog.catalog import Catalog

DEFAULT_PCA_DIM = 256
WHITENING_EPS = 1e-6


def fit_whitening(x: np.ndarray, dim: int = DEFAULT_PCA_DIM, eps: float = WHITENING_EPS
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
    """PCA whitening ``w = (v - mu) @ W``, ``W = eigvecs / sqrt(eigvals + eps)``.

    Keeps ``min(dim, rank)`` directions: with fewer photos than dimensions
    the rest of the spectrum is numerically zero and whitening it would only
    amplify noise.
    """
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0, keepdims=True)
    centred = x - mu
    cov = centred.T @ centred / max(len(x) - 1, 1)
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = np.maximum(eigvals[order], 0.0), eigvecs[:, order]
    # Deterministic sign per direction, so identical data gives identical W everywhere.
    signs = np.sign(eigvecs[np.abs(eigvecs).argmax(axis=0), np.arange(eigvecs.shape[1])])
    eigvecs = eigvecs * np.where(signs == 0, 1.0, signs)
    rank = int((eigvals > eigvals[0] * 1e-9).sum()) if eigvals[0] > 0 else 0
    k = max(1, min(dim, rank))
    w = eigvecs[:, :k] / np.sqrt(eigvals[:k] + eps)
    info = {"requested_dim": dim, "output_dim": k, "rank": rank, "eps": eps,
            "explained_variance": float(eigvals[:k].sum() / max(eigvals.sum(), 1e-300))}
    return mu.astype(np.float32), w.astype(np.float32), info


def choose_common(counts: dict[str, int], top_n: int | None, min_count: int | None
                  ) -> set[str]:
    """The head's species: the N most frequent (ties by name) or those with >= min_count."""
    if min_count is not None:
        return {s for s, c in counts.items() if c >= min_count}
    ranked = sorted(counts, key=lambda s: (-counts[s], s))
    return set(ranked[: top_n if top_n is not None else 50])


def text_prompts(species: list[str], catalog: Catalog) -> list[str]:
    """BioCLIP-style caption from the catalog; a bare name for species it lacks."""
    prompts = []
    for name in species:
        record = catalog.get(name)
        prompts.append(record.prompt() if record else f"a photo of {name}.")
    return prompts
