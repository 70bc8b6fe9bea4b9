"""How well confidences match accuracy: what fitting and evaluating both measure."""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error, equal-width bins (Guo et al. 2017)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(confidence[mask].mean() - correct[mask].mean())
    return float(total)


def top1_calibration(probs: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(ECE, NLL) of a full distribution's top-1 against labels (rows with truth >= 0)."""
    keep = truth >= 0
    if not keep.any() or probs.shape[1] == 0:
        return 0.0, 0.0
    p = probs[keep]
    t = truth[keep]
    top = p.argmax(axis=1)
    nll = float(-np.log(np.maximum(p[np.arange(len(t)), t], 1e-12)).mean())
    return ece(p.max(axis=1), top == t), nll
