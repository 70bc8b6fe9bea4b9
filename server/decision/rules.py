"""Decision rules, as pure vectorised numpy shared by the service and the tools.

``route_hybrid`` is the BioLit seed's cascade (``docs/seed-v4.md``, "Routing",
bundles with ``routing: seed``), kept bit-exact so imported seed bundles
decide as the seed did. ``route_fused`` is the rule of ``routing: fused``
bundles: one calibrated distribution over every species, one cut on the
answer's probability. Species indices are global (prototype-set order); the
head's classes map onto them via ``common_to_global``.
"""

from __future__ import annotations

import numpy as np

from biolit_id.server.decision.types import Method, Routed, Thresholds, photo_groups


def route_hybrid(
    p_common: np.ndarray,
    p_proto: np.ndarray,
    common_to_global: np.ndarray,
    thresholds: Thresholds,
) -> Routed:
    """The seed's four rules, in order, for a batch.

    1. max p_common >= high                      -> CLASSIFIER, argmax p_common
    2. max p_proto >= proto and argmax is rare   -> PROTOTYPE, argmax p_proto
    3. max p_common >= low                       -> CLASSIFIER_LOW
    4. otherwise                                 -> REJECTED, max of both maxima
    """
    p_common = np.asarray(p_common, dtype=np.float64)
    p_proto = np.asarray(p_proto, dtype=np.float64)
    n = p_proto.shape[0]
    is_rare = np.ones(p_proto.shape[1], dtype=bool)
    is_rare[common_to_global] = False

    if p_common.shape[1]:
        c_idx = p_common.argmax(axis=1)
        c_max = p_common[np.arange(n), c_idx]
        c_global = common_to_global[c_idx]
    else:  # no head: only prototypes can answer
        c_max = np.zeros(n)
        c_global = np.full(n, -1)
    p_idx = p_proto.argmax(axis=1)
    p_max = p_proto[np.arange(n), p_idx]

    rule1 = c_max >= thresholds.classifier_high
    rule2 = ~rule1 & (p_max >= thresholds.prototype) & is_rare[p_idx]
    rule3 = ~rule1 & ~rule2 & (c_max >= thresholds.classifier_low)
    method = np.full(n, int(Method.REJECTED))
    method[rule1] = Method.CLASSIFIER
    method[rule2] = Method.PROTOTYPE
    method[rule3] = Method.CLASSIFIER_LOW
    species = np.where(rule1 | rule3, c_global, np.where(rule2, p_idx, -1))
    confidence = np.where(
        rule1 | rule3, c_max, np.where(rule2, p_max, np.maximum(c_max, p_max))
    )
    return Routed(method=method, species=species, confidence=confidence)


def route_fused(distribution: np.ndarray, thresholds: Thresholds,
                species_group: np.ndarray | None = None) -> Routed:
    """Answer the most probable species when its probability passes its group's cut.

    A photo's group is where its mass lies (``photo_groups``): a false record of
    a rare species costs more than a rejection, so its cut may be stricter. The
    confidence is the answer's probability whether or not it passes, so the cuts
    sweep the risk-coverage curve.
    """
    dist = np.asarray(distribution, dtype=np.float64)
    n = len(dist)
    if dist.shape[1] == 0:
        return Routed(np.full(n, int(Method.REJECTED)), np.full(n, -1), np.zeros(n))
    idx = dist.argmax(axis=1)
    top = dist[np.arange(n), idx]
    cut = thresholds.group_cuts()[photo_groups(dist, species_group)]
    accepted = (top >= cut) & (top > 0)
    method = np.where(accepted, int(Method.FUSED), int(Method.REJECTED))
    return Routed(method=method, species=np.where(accepted, idx, -1), confidence=top)


def route_zero_shot(p_text: np.ndarray, thresholds: Thresholds) -> Routed:
    """Accept the best text prototype when its softmax mass passes the threshold."""
    p_text = np.asarray(p_text, dtype=np.float64)
    idx = p_text.argmax(axis=1)
    top = p_text[np.arange(len(idx)), idx]
    accepted = top >= thresholds.zero_shot
    method = np.where(accepted, int(Method.ZERO_SHOT), int(Method.REJECTED))
    return Routed(method=method, species=np.where(accepted, idx, -1), confidence=top)


def routed_distribution(
    method: np.ndarray,
    p_common: np.ndarray,
    p_proto: np.ndarray,
    common_to_global: np.ndarray,
) -> np.ndarray:
    """Species distribution consistent with each routing decision ([B, S]).

    docs/seed-v4.md, "Taxonomic confidence": classifier methods -> p_common on
    the global species (rare = 0); prototype -> p_proto; rejected -> 0.5
    p_common + 0.5 p_proto for common species, 0.5 p_proto for rare ones,
    renormalised. Zero-shot answers use p_proto (the text prototypes).
    """
    p_common = np.asarray(p_common, dtype=np.float64)
    p_proto = np.asarray(p_proto, dtype=np.float64)
    common_global = np.zeros_like(p_proto)
    if p_common.shape[1]:
        common_global[:, common_to_global] = p_common
    method = np.asarray(method)[:, None]
    classifier = (method == Method.CLASSIFIER) | (method == Method.CLASSIFIER_LOW)
    mixed = 0.5 * common_global + 0.5 * p_proto
    dist = np.where(classifier, common_global, np.where(method == Method.REJECTED, mixed, p_proto))
    total = dist.sum(axis=1, keepdims=True)
    return dist / np.where(total > 0, total, 1.0)


def masked_softmax(logits: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if allowed is not None:
        logits = np.where(allowed[None, :], logits, -np.inf)
        if not allowed.any():
            return np.zeros_like(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
