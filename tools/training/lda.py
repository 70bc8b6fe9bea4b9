"""Shrinkage LDA: one pooled within-species covariance, shrunk toward a scaled identity.

Fitted in the bundle's whitening *before* its normalisation, the discriminants
are affine in the raw embedding, so a served LDA is a head with no hidden
layer (``LDA_HEAD``): the service, the device graph and the runtime-species
simulation load it as they load the MLP head. Equal class priors: the prior
is a fitted choice of the decision family (crossfit), not part of LDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LDA_SHRINKAGE = 0.1  # the served family's (the bench's baseline chooses its own)
LDA_HEAD = {"type": "lda", "hidden": [], "dropout": [], "layernorm": False,
            "shrinkage": LDA_SHRINKAGE}


def lda_discriminants(z: np.ndarray, y: np.ndarray, n_classes: int, shrinkage: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(A [d, n_classes], bias [n_classes]): the discriminant of class k is z @ A[:, k] + bias[k].
    A class without rows gets bias -inf (it never wins)."""
    z = np.asarray(z, np.float64)
    means = np.zeros((n_classes, z.shape[1]))
    np.add.at(means, y, z)
    counts = np.bincount(y, minlength=n_classes)
    means /= np.maximum(counts, 1)[:, None]
    resid = z - means[y]
    within = resid.T @ resid / max(len(z) - n_classes, 1)
    d = within.shape[0]
    sigma = (1 - shrinkage) * within + shrinkage * np.trace(within) / d * np.eye(d)
    a = np.linalg.solve(sigma, means.T)
    bias = -0.5 * np.einsum("sd,ds->s", means, a)
    bias[counts == 0] = -np.inf
    return a, bias


def lda_head_state(x: np.ndarray, y: np.ndarray, classes: Sequence[int], mu: np.ndarray,
                   w: np.ndarray, shrinkage: float = LDA_SHRINKAGE) -> dict[str, np.ndarray]:
    """The ``LDA_HEAD`` state over ``classes`` (species indices), fitted on the rows of raw
    embeddings ``x`` labelled with them, in the whitening ``(x - mu) @ w``."""
    cidx = {int(c): i for i, c in enumerate(classes)}
    rows = np.flatnonzero(np.isin(y, list(cidx)))
    yy = np.array([cidx[int(v)] for v in y[rows]], dtype=np.int64)
    mu, w = np.asarray(mu, np.float64), np.asarray(w, np.float64)
    a, bias = lda_discriminants((np.asarray(x[rows], np.float64) - mu) @ w, yy, len(cidx),
                                shrinkage)
    bias = np.where(np.isfinite(bias), bias, np.finfo(np.float32).min / 4)
    weight = (w @ a).T  # [C, D]: logits = x @ weight.T + (bias - mu @ w @ a)
    return {"0.weight": weight.astype(np.float32),
            "0.bias": (bias - (mu.reshape(1, -1) @ w @ a).ravel()).astype(np.float32)}
