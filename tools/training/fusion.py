"""Fitting ``routing: fused``: the prototype alpha, the fusion weights, the new-species terms.

All by validation NLL, so the probabilities are calibrated by construction.
New-species terms can only be fitted honestly on species the head never
saw: a second head is trained without some, which then come back as
AddExemplars would bring them (docs/training.md, "routing: fused").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from biolit_id.cli.training.calibration_metrics import top1_calibration
from biolit_id.cli.training.datasets import EmbeddingSet
from biolit_id.index.core.vectors import SEED_ITERATIONS, fuse_prototypes, weighted_prototype
from biolit_id.server.decision.bundle import Bundle
from biolit_id.server.decision.fused import (
    NEIGHBOURS,
    RUNTIME_PHOTOS,
    FusionWeights,
    fused_logits,
    log_softmax,
    neighbour_similarity,
)
from biolit_id.server.decision.head import Head
from biolit_id.server.decision.rules import masked_softmax

log = logging.getLogger(__name__)

HEAD_TERMS = ("proto", "head", "prior")
NOVEL_TERMS = ("novel_proto", "novel_knn", "novel_offset")
ALPHAS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
SIMULATED_SHARE = 0.10  # of head species left out of the simulation's head
SIMULATED_MAX = 12


def fusion_logits_torch(w: dict, cos, head_lp, c2g, log_prior, near):
    """``server.decision.fused.fused_logits`` in torch (a test keeps the two equal)."""
    import torch

    level = w["prior"] * log_prior.mean() if len(log_prior) else 0.0
    z = w["novel_proto"] * cos + w["novel_knn"] * near + w["novel_offset"] + level
    if len(c2g):
        head_part = w["proto"] * cos[:, c2g] + w["head"] * head_lp + w["prior"] * log_prior
        z = z.index_copy(1, torch.as_tensor(c2g, dtype=torch.long), head_part)
    return z


def fit_fusion(cos: np.ndarray, head_logits: np.ndarray, c2g: np.ndarray,
               log_prior: np.ndarray, knn: np.ndarray | None, truth: np.ndarray,
               init: FusionWeights, free: Sequence[str], max_iter: int = 300) -> FusionWeights:
    """The weights in ``free`` minimising validation NLL, the others kept from ``init``."""
    import torch

    keep = np.asarray(truth) >= 0
    if not keep.any() or not free:
        return init
    cos = np.asarray(cos, dtype=np.float64)[keep]
    near = cos if knn is None else np.where(np.isnan(knn[keep]), cos, knn[keep])
    head_lp = (log_softmax(head_logits[keep]) if head_logits.shape[1]
               else np.zeros((int(keep.sum()), 0)))
    t = {k: torch.as_tensor(v, dtype=torch.float64)
         for k, v in (("cos", cos), ("near", near), ("head", head_lp),
                      ("prior", np.asarray(log_prior, dtype=np.float64)))}
    y = torch.as_tensor(np.asarray(truth)[keep], dtype=torch.long)
    start = init.to_json()
    params = {k: torch.tensor(start[k], dtype=torch.float64, requires_grad=k in free)
              for k in start}
    opt = torch.optim.LBFGS([params[k] for k in free], lr=0.5, max_iter=max_iter,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = fusion_logits_torch(params, t["cos"], t["head"], c2g, t["prior"], t["near"])
        loss = torch.nn.functional.cross_entropy(z, y)
        loss.backward()
        return loss

    opt.step(closure)
    fitted = {k: float(v.detach()) for k, v in params.items()}
    if not all(np.isfinite(list(fitted.values()))):
        log.warning("fusion fit diverged; keeping the previous weights")
        return init
    return FusionWeights.from_json(fitted)


def nll(probs: np.ndarray, truth: np.ndarray) -> float:
    keep = truth >= 0
    if not keep.any():
        return 0.0
    return float(-np.log(np.maximum(probs[keep, truth[keep]], 1e-12)).mean())


def choose_alpha(visual: np.ndarray, text: np.ndarray, val_w: np.ndarray, val_y: np.ndarray,
                 fit_scale, grid: Sequence[float] = ALPHAS) -> tuple[float, dict]:
    """The Proto-CLIP visual weight whose prototypes give the lowest validation NLL.

    A text tower that says nothing about these species (the random demo model,
    or prompts that do not fit the photos) is weighted out instead of
    blurring every prototype.
    """
    report = {}
    best = (np.inf, 1.0)
    for alpha in grid:
        sims = val_w @ fuse_prototypes(visual, text, alpha).T.astype(np.float64)
        scale = fit_scale(sims, val_y, 10.0)
        loss = nll(masked_softmax(scale * sims, None), val_y)
        report[f"{alpha:.2f}"] = loss
        best = min(best, (loss, alpha))
    return best[1], {"validation_nll": report, "chosen": best[1]}


def simulated_species(head_ids: Sequence[int], train_y: np.ndarray, val_y: np.ndarray,
                      seed: int) -> list[int]:
    """Head species to leave out of the simulation's head: ones with validation photos."""
    eligible = [c for c in head_ids if (val_y == c).any() and (train_y == c).sum() >= 2]
    k = int(min(SIMULATED_MAX, max(1, round(SIMULATED_SHARE * len(head_ids)))))
    if len(eligible) < 2 or len(head_ids) - k < 2:
        return []
    rng = np.random.default_rng(seed + 7919)
    return sorted(int(c) for c in rng.choice(eligible, size=min(k, len(eligible) - 1),
                                             replace=False))


def runtime_prototypes(train_w: np.ndarray, train_y: np.ndarray, species: Sequence[int],
                       text: np.ndarray, alpha: float, iterations: int
                       ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Prototypes and reference photos of ``species`` as 20 curator photos would make them
    (``index.prototypes.PrototypeBuilder.fused`` for a species new to the bundle)."""
    protos, photos = [], []
    for c in species:
        mine = train_w[train_y == c][:RUNTIME_PHOTOS]
        photos.append(mine)
        visual = weighted_prototype(mine, iterations)
        protos.append(fuse_prototypes(visual[None, :], text[c][None, :], alpha)[0])
    return np.asarray(protos, dtype=np.float32), photos


def simulate_runtime_species(train_w: np.ndarray, train_y: np.ndarray, val_w: np.ndarray,
                             val_y: np.ndarray, val_x: np.ndarray, prototypes: np.ndarray,
                             text: np.ndarray, alpha: float, log_prior_all: np.ndarray,
                             head_ids: Sequence[int], held: Sequence[int], train_aux_head,
                             init: FusionWeights,
                             iterations: int = SEED_ITERATIONS
                             ) -> tuple[FusionWeights, dict]:
    """Fit the new-species terms on species the (auxiliary) head never saw.

    ``train_aux_head(head_ids)`` trains a head over those species and returns
    a function raw embeddings -> logits. Prototypes of the held-out species
    are rebuilt from 20 photos; every other species keeps its trained one.
    The head-side terms stay as ``init`` (the real head's): the new-species
    offset is only meaningful against the level the served head will have.
    """
    aux_ids = [c for c in head_ids if c not in set(held)]
    logits_of = train_aux_head(aux_ids)
    protos = np.asarray(prototypes, dtype=np.float64).copy()
    runtime, photos = runtime_prototypes(train_w, train_y, held, text, alpha, iterations)
    protos[list(held)] = runtime
    cos = val_w @ protos.T
    knn = np.full(cos.shape, np.nan)
    knn[:, list(held)] = neighbour_similarity(val_w, photos)
    c2g = np.asarray(aux_ids, dtype=np.int64)
    logits = logits_of(val_x)
    prior = log_prior_all[c2g]
    in_head = np.isin(val_y, c2g)
    fitted = fit_fusion(cos, logits, c2g, prior, knn, val_y, init, NOVEL_TERMS)
    probs = masked_softmax(fused_logits(cos, log_softmax(logits), c2g, prior, knn, fitted),
                           None)
    novel = np.isin(val_y, held)
    top = probs.argmax(axis=1)
    as_new = np.isin(top, held)
    report = {
        "held_out_species": len(held), "validation_photos": int(novel.sum()),
        "held_out_top1": float((top[novel] == val_y[novel]).mean()) if novel.any() else None,
        "head_species_top1": float((top[in_head] == val_y[in_head]).mean()),
        # Of the photos whose best guess is a new species, the share really of one.
        "new_species_guesses_right": float((top[as_new] == val_y[as_new]).mean())
        if as_new.any() else None,
        "weights": fitted.to_json(),
    }
    return replace(init, **{k: getattr(fitted, k) for k in NOVEL_TERMS}), report


def fit_fused(bundle: Bundle, train_w: np.ndarray, train_y: np.ndarray, val: EmbeddingSet,
              val_y: np.ndarray, head_ids: Sequence[int], seed: int,
              train_aux: Callable[[list[int]], dict]) -> tuple[dict, dict]:
    """The ``fusion`` manifest entry of a fused bundle, and what validation says of it.

    ``train_aux(species ids)`` trains a head (same settings) over those species
    only and returns its state; it runs once, for the simulation.
    """
    keep = val_y >= 0
    val_x, vy = val.embeddings[keep], val_y[keep]
    val_w = bundle.whiten(val_x).astype(np.float64)
    counts = np.bincount(train_y, minlength=len(bundle.species)).astype(np.float64)
    head_ids = np.asarray(head_ids, dtype=np.int64)
    log_prior_all = np.log(np.maximum(counts, 1.0) / max(counts[head_ids].sum(), 1.0))
    log_prior = log_prior_all[head_ids]
    init = FusionWeights.default(bundle.temperature, len(head_ids))
    config, dim = bundle.head_config, bundle.embedding_dim

    def aux_logits(ids: list[int]):
        return Head(train_aux(ids), dim, len(ids), config).logits

    # The served head's terms first, on the real validation set; then the new-species
    # terms against them, by simulation.
    cos = val_w @ bundle.prototypes.T.astype(np.float64)
    logits = (Head(bundle.head_state, dim, len(head_ids), config).logits(val_x)
              if len(head_ids) else np.zeros((len(vy), 0)))
    free = HEAD_TERMS if len(head_ids) else ("novel_proto", "novel_offset")
    weights = fit_fusion(cos, logits, head_ids, log_prior, None, vy, init, free)
    held = simulated_species(head_ids.tolist(), train_y, vy, seed) if len(vy) else []
    if held:
        weights, simulation = simulate_runtime_species(
            train_w, train_y, val_w, vy, val_x, bundle.prototypes, bundle.text_prototypes,
            bundle.alpha, log_prior_all, head_ids.tolist(), held, aux_logits, weights)
        simulation["species"] = [bundle.species[c] for c in held]
    else:
        simulation = {"skipped": "too few species with validation photos to leave some out; "
                                 "new species use default weights"}
    probs = masked_softmax(fused_logits(cos, log_softmax(logits) if len(head_ids) else logits,
                                        head_ids, log_prior, None, weights), None)
    ece_v, nll_v = top1_calibration(probs, vy)
    info = {"validation_top1": float((probs.argmax(1) == vy).mean()) if len(vy) else None,
            "validation_ece": ece_v, "validation_nll": nll_v, "simulation": simulation}
    fusion = {"weights": weights.to_json(), "head_log_prior": log_prior.tolist(),
              "fitted_on": "validation", "new_species_fitted_on": (
                  "simulation" if held else "default"), "neighbours": NEIGHBOURS}
    return fusion, info


def fit_runtime_terms(bundle: Bundle, train_w: np.ndarray, train_y: np.ndarray,
                      val: EmbeddingSet, val_y: np.ndarray, head_ids: Sequence[int], seed: int,
                      train_aux: Callable[[list[int]], dict], weights: FusionWeights
                      ) -> tuple[FusionWeights, dict]:
    """``weights`` with the runtime-species terms fitted by simulation against them
    (the head-side terms, chosen out of fold, are kept)."""
    keep = val_y >= 0
    val_x, vy = val.embeddings[keep], val_y[keep]
    head_ids = np.asarray(head_ids, dtype=np.int64)
    held = simulated_species(head_ids.tolist(), train_y, vy, seed) if len(vy) else []
    if not held:
        return weights, {"skipped": "too few species with validation photos to leave some "
                                    "out; runtime species use the fitted prototype terms"}
    counts = np.bincount(train_y, minlength=len(bundle.species)).astype(np.float64)
    log_prior_all = np.log(np.maximum(counts, 1.0) / max(counts[head_ids].sum(), 1.0))
    config, dim = bundle.head_config, bundle.embedding_dim

    def aux_logits(ids: list[int]):
        return Head(train_aux(ids), dim, len(ids), config).logits

    fitted, report = simulate_runtime_species(
        train_w, train_y, bundle.whiten(val_x).astype(np.float64), vy, val_x,
        bundle.prototypes, bundle.text_prototypes, bundle.alpha, log_prior_all,
        head_ids.tolist(), held, aux_logits, weights, bundle.prototype_iterations)
    report["species"] = [bundle.species[c] for c in held]
    return fitted, report
