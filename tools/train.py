"""``biolit-id train``: embeddings -> a bundle (head, prototypes, whitening, fusion weights).

The seed's recipe made reproducible (seeded split recorded in the bundle, so
``evaluate`` never sees training photos), for both decision rules
(``--routing fused`` or ``seed``). Steps, options and departures from the
seed: docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from biolit_id.cli.evaluation.metrics import fit_logit_scale
from biolit_id.cli.training.calibration_metrics import top1_calibration
from biolit_id.cli.training.crossfit import (
    CALIBRATION_SHARE,
    FOLDS,
    choose_family,
    early_stopping_rows,
    family_lines,
    fitting_and_calibration,
    out_of_fold,
)
from biolit_id.cli.training.datasets import (
    DatasetError,
    EmbeddingSet,
    fingerprint,
    read_embeddings,
    stratified_split,
    write_embeddings,
)
from biolit_id.cli.training.features import (
    DEFAULT_PCA_DIM,
    choose_common,
    fit_whitening,
    text_prompts,
)
from biolit_id.cli.training.fusion import choose_alpha, fit_fused, fit_runtime_terms
from biolit_id.cli.training.head import FUSED_HEAD, HeadSettings, fit_head_on, train_head
from biolit_id.cli.training.lda import LDA_HEAD, lda_head_state
from biolit_id.cli.training.rank_heads import RankHeadSettings, train_rank_heads
from biolit_id.cli.training.rank_thresholds import simulated_rank_thresholds
from biolit_id.index.core.vectors import class_prototypes, fuse_prototypes
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import DEFAULT_HEAD, Bundle
from biolit_id.server.decision.fused import NEIGHBOURS
from biolit_id.server.decision.head import Head
from biolit_id.server.decision.rules import masked_softmax
from biolit_id.server.decision.types import Thresholds
from biolit_id.server.inference.model_loader import DEFAULT_MODEL

log = logging.getLogger(__name__)

SPLIT_DIR = "split"
FRACTIONS = (0.70, 0.15, 0.15)
CALIBRATION_FILE = f"{SPLIT_DIR}/calibration.parquet"
INITIAL_TEMPERATURE = 10.0
HEAD_MIN_COUNT = 5  # routing fused: training photos a species needs for a head class


# ------------------------------------------------------------ the command


def build_bundle(train: EmbeddingSet, val: EmbeddingSet, loaded, catalog: Catalog,
                 alpha: float | None = None, common_n: int | None = 50,
                 min_count: int | None = None, seed: int = 0, pca_dim: int = DEFAULT_PCA_DIM,
                 proto_iterations: int = 2, head: HeadSettings | None = None,
                 progress: bool = True, routing: str = "fused",
                 head_min_count: int = HEAD_MIN_COUNT, fit_fusion: bool = True) -> Bundle:
    """Everything but the split bookkeeping: data in, an in-memory bundle out.

    ``routing="seed"``: the seed's head over the common species (``common_n``
    most frequent, or ``min_count``) and its cascade. ``"fused"``: a
    logit-adjusted head over every species with ``head_min_count`` photos and
    the fused decision (``server.decision.fused``); the common/rare split then only
    groups the evaluation report.
    """
    if routing not in ("seed", "fused"):
        raise ValueError(f"unknown routing {routing!r}")
    head = head or (FUSED_HEAD if routing == "fused" else HeadSettings())
    np.random.seed(seed)
    counts = train.counts()
    species = sorted(counts)
    index = {s: i for i, s in enumerate(species)}
    common_set = choose_common(counts, common_n, min_count)
    common = [s for s in species if s in common_set]
    head_classes = (common if routing == "seed"
                    else [s for s in species if counts[s] >= head_min_count])
    y_train = np.array([index[s] for s in train.species], dtype=np.int64)
    y_val = np.array([index.get(s, -1) for s in val.species], dtype=np.int64)
    unknown_val = sorted({s for s in val.species if s not in index})
    if unknown_val:
        log.warning("%d validation species have no training photos and are ignored: %s",
                    len(unknown_val), ", ".join(unknown_val[:10]))

    mu, w, whitening_info = fit_whitening(train.embeddings, pca_dim)
    bundle = Bundle(
        model_id=loaded.spec, model_fingerprint=loaded.fingerprint,
        embedding_dim=loaded.embedding_dim, species=species, common=head_classes,
        head_config=dict(DEFAULT_HEAD), head_state={},
        visual_prototypes=np.zeros((0, 0), np.float32),
        text_prototypes=np.zeros((0, 0), np.float32), prototypes=np.zeros((0, 0), np.float32),
        whitening_mu=mu, whitening_W=w, temperature=INITIAL_TEMPERATURE, alpha=0.8,
        thresholds=Thresholds(), routing=routing,
        preprocessing=dict(train.meta.get("preprocessing") or {
            "image_size": loaded.image_size, "mean": list(loaded.mean), "std": list(loaded.std),
            "resize": "squash"}),
    )
    log.info("whitening: %d-d -> %d-d (rank %d)", loaded.embedding_dim,
             whitening_info["output_dim"], whitening_info["rank"])

    prompts = text_prompts(species, catalog)
    bundle.text_prototypes = bundle.whiten(loaded.encode_text(prompts))
    train_w = bundle.whiten(train.embeddings).astype(np.float64)
    bundle.visual_prototypes = class_prototypes(train_w, y_train, len(species), proto_iterations)

    # Prototype temperature by gradient on validation (falls back to train if val is empty).
    calib_x, calib_y, calib_on = val.embeddings[y_val >= 0], y_val[y_val >= 0], "val"
    if len(calib_y) == 0:
        log.warning("no validation photo of a known species: temperature fitted on train")
        calib_x, calib_y, calib_on = train.embeddings, y_train, "train"
    calib_w = bundle.whiten(calib_x).astype(np.float64)
    alpha_info = None
    if alpha is None and routing == "fused":
        alpha, alpha_info = choose_alpha(bundle.visual_prototypes, bundle.text_prototypes,
                                         calib_w, calib_y, fit_logit_scale)
    bundle.alpha = 0.8 if alpha is None else float(alpha)
    bundle.prototypes = fuse_prototypes(bundle.visual_prototypes, bundle.text_prototypes,
                                        bundle.alpha)
    sims = calib_w @ bundle.prototypes.T.astype(np.float64)
    bundle.temperature = fit_logit_scale(sims, calib_y, INITIAL_TEMPERATURE)
    ece_t1, nll_t1 = top1_calibration(masked_softmax(sims, None), calib_y)
    ece_t, nll_t = top1_calibration(masked_softmax(bundle.temperature * sims, None), calib_y)
    proto_acc = float((sims.argmax(1) == calib_y).mean()) if len(calib_y) else 0.0

    def fit_head(classes: list[str], negatives: bool = True):
        cidx = {s: i for i, s in enumerate(classes)}
        tr = np.array([s in cidx for s in train.species])
        va = np.array([s in cidx for s in val.species])
        return train_head(
            train.embeddings[tr], np.array([cidx[s] for s in np.asarray(train.species)[tr]]),
            val.embeddings[va], np.array([cidx[s] for s in np.asarray(val.species)[va]],
                                         dtype=np.int64),
            len(classes), bundle.head_config, seed, head,
            x_negative=train.embeddings[~tr] if negatives else None, progress=progress,
        )

    head_info: dict = {}
    if head_classes:
        bundle.head_state, head_info = fit_head(head_classes)
    fusion_info = None
    if routing == "fused" and fit_fusion:
        bundle.fusion, fusion_info = fit_fused(
            bundle, train_w, y_train, val, y_val, [index[s] for s in head_classes], seed,
            lambda ids: fit_head([species[i] for i in ids], negatives=False)[0])
    bundle.metrics = {
        "validation": {
            "prototype_accuracy": proto_acc,
            "prototype_temperature_fitted_on": calib_on,
            "prototype_ece_at_T1": ece_t1, "prototype_nll_at_T1": nll_t1,
            "prototype_ece": ece_t, "prototype_nll": nll_t,
            "head_accuracy": head_info.get("val_accuracy"),
            **({"fused": fusion_info} if fusion_info else {}),
        }
    }
    bundle.extra = {
        "training": {"seed": seed, "alpha": bundle.alpha, "alpha_fit": alpha_info,
                     "routing": routing, "common_rule": (
                         {"min_count": min_count} if min_count is not None
                         else {"top_n": common_n}),
                     "head_min_count": head_min_count if routing == "fused" else None,
                     "prototype_iterations": proto_iterations, "head": head_info,
                     "whitening": whitening_info},
        # The long tail's two groups, for reports: the seed's rule (the most frequent).
        "groups": {"common": common},
        "train_counts": {s: counts[s] for s in species},
        "catalog_version": catalog.version,
        "prompts": dict(zip(species, prompts, strict=True)),
    }
    bundle.training_fingerprint = fingerprint(train)
    return bundle


def set_prototypes(bundle: Bundle, train: EmbeddingSet, val: EmbeddingSet,
                   iterations: int) -> None:
    """The bundle's prototypes by the chosen recipe, and their temperature (candidates)."""
    index = {s: i for i, s in enumerate(bundle.species)}
    y = np.array([index[s] for s in train.species], dtype=np.int64)
    bundle.visual_prototypes = class_prototypes(bundle.whiten(train.embeddings).astype(
        np.float64), y, len(bundle.species), iterations)
    bundle.prototypes = fuse_prototypes(bundle.visual_prototypes, bundle.text_prototypes,
                                        bundle.alpha)
    keep = np.array([s in index for s in val.species])
    if keep.any():
        vy = np.array([index[s] for s in np.asarray(val.species)[keep]], dtype=np.int64)
        sims = bundle.whiten(val.embeddings[keep]).astype(np.float64) @ bundle.prototypes.T
        bundle.temperature = fit_logit_scale(sims, vy, INITIAL_TEMPERATURE)
    bundle.extra["training"]["prototype_iterations"] = iterations


def serve_lda_head(bundle: Bundle, x: np.ndarray, y: np.ndarray, head_ids: Sequence[int]
                   ) -> None:
    """The bundle's head becomes shrinkage LDA over ``head_ids``, fitted on ``x``, ``y``
    (species indices) in the bundle's whitening."""
    bundle.head_config = dict(LDA_HEAD)
    bundle.head_state = lda_head_state(x, y, head_ids, bundle.whitening_mu, bundle.whitening_W)


def build_crossfitted(train: EmbeddingSet, val: EmbeddingSet, loaded, catalog: Catalog,
                      folds: int = FOLDS, **settings) -> tuple[Bundle, EmbeddingSet]:
    """``routing: fused`` with its decision family chosen out of fold (docs/training.md).

    Train and validation are pooled; a stratified calibration fold is kept apart
    for ``calibrate`` (returned); the rest is cut into an inner split for the
    components (whitening, prototypes, the head early-stopped on the inner 15 %) and
    into ``folds`` folds whose out-of-fold scores choose the family and its weights.
    """
    seed = int(settings.get("seed", 0))
    fitting, calibration = fitting_and_calibration(train, val, seed)
    index = {s: i for i, s in enumerate(sorted(set(fitting.species) | set(calibration.species)))}
    y_fit = np.array([index[s] for s in fitting.species], dtype=np.int64)
    stop = early_stopping_rows(y_fit, seed)
    inner, stopping = fitting.subset(np.flatnonzero(~stop)), fitting.subset(np.flatnonzero(stop))
    bundle = build_bundle(inner, stopping, loaded, catalog, routing="fused", fit_fusion=False,
                          **settings)
    head = settings.get("head") or FUSED_HEAD
    species = bundle.species
    sidx = {s: i for i, s in enumerate(species)}
    y = np.array([sidx[s] for s in fitting.species], dtype=np.int64)
    head_ids = [sidx[s] for s in bundle.common]

    def fit_fold_head(x: np.ndarray, labels: np.ndarray):
        state = fit_head_on(x, labels, head_ids, head, bundle.head_config, seed)
        return Head(state, bundle.embedding_dim, len(head_ids), bundle.head_config).logits

    text_raw = loaded.encode_text(text_prompts(species, catalog))
    oof = out_of_fold(fitting.embeddings, y, len(species), head_ids, fit_fold_head, text_raw,
                      bundle.alpha, int(settings.get("pca_dim", DEFAULT_PCA_DIM)),
                      folds=folds, seed=seed)
    common = set(bundle.extra["groups"]["common"])
    rare = np.array([s not in common for s in species])
    choice = choose_family(oof, rare, with_head=bool(head_ids))
    set_prototypes(bundle, inner, stopping, choice.prototype_iterations)
    inner_y = np.array([sidx[s] for s in inner.species], dtype=np.int64)
    counts = np.bincount(inner_y, minlength=len(species)).astype(np.float64)
    ids = np.asarray(head_ids, dtype=np.int64)
    log_prior = (np.log(np.maximum(counts[ids], 1.0) / max(counts[ids].sum(), 1.0))
                 if len(ids) else np.zeros(0))
    weights, runtime = choice.weights, {"tied": "runtime species are scored as trained ones"}
    if choice.head == "lda":
        serve_lda_head(bundle, fitting.embeddings, y, head_ids)

    def fit_aux_head(ids: list[int]) -> dict:
        if choice.head == "lda":
            return lda_head_state(inner.embeddings, inner_y, ids, bundle.whitening_mu,
                                  bundle.whitening_W)
        return fit_head_on(inner.embeddings, inner_y, ids, head, bundle.head_config, seed)

    if choice.needs_head:
        weights, runtime = fit_runtime_terms(
            bundle, bundle.whiten(inner.embeddings).astype(np.float64), inner_y, stopping,
            np.array([sidx.get(s, -1) for s in stopping.species]), head_ids, seed,
            fit_aux_head, weights)
    bundle.fusion = {"weights": weights.to_json(), "head_log_prior": log_prior.tolist(),
                     "family": choice.name, "head": choice.head,
                     "fitted_on": f"out of fold ({folds} folds)",
                     "new_species_fitted_on": runtime, "neighbours": NEIGHBOURS}
    bundle.extra["decision_families"] = choice.to_json()
    return bundle, calibration


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", type=Path, required=True, help="training parquet")
    parser.add_argument("--val", type=Path, default=None,
                        help="validation parquet (default: seeded stratified 70/15/15 split)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model that made the embeddings (text prompts use it too)")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    parser.add_argument("--routing", choices=("fused", "seed"), default="fused",
                        help="decision rule: 'fused' (default: one calibrated distribution "
                             "over every species) or 'seed' (the seed's cascade)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="visual weight in the prototype fusion (1.0 = visual only; "
                             "default: fitted on validation for fused, 0.8 for seed)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--common", type=int, default=None,
                       help="the N most frequent species are 'common' (default 50): the "
                            "seed routing's head, the report's common group")
    group.add_argument("--min-count", type=int, default=None,
                       help="species with at least this many training photos are 'common'")
    parser.add_argument("--head-min-count", type=int, default=HEAD_MIN_COUNT,
                        help="fused: training photos a species needs for a head class "
                             "(default %(default)s; others are scored like runtime species)")
    parser.add_argument("--logit-adjust", type=float, default=None, metavar="TAU",
                        help="logit-adjusted head loss (default 1.0 for fused, 0 for seed)")
    parser.add_argument("--catalog", type=Path, default=None,
                        help="species catalog JSON for prompts (default: the built-in one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pca-dim", type=int, default=DEFAULT_PCA_DIM)
    parser.add_argument("--prototype-iterations", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--balanced", action="store_true",
                        help="class-balanced loss for the head (effective-number weights)")
    parser.add_argument("--rare-negatives", type=float, default=HeadSettings.rare_negatives,
                        metavar="WEIGHT",
                        help="train the head to output uniform on rare species' photos, with "
                             "this loss weight (default %(default)s; 0 = the seed's head)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the head")
    parser.add_argument("--folds", type=int, default=FOLDS,
                        help="fused: cross-fitting folds that choose the decision family "
                             "(default %(default)s)")
    parser.add_argument("--rank-heads", action="store_true",
                        help="also fit one head per rank (kingdom ... genus) on the photos that "
                             "have it; served, they answer only where the species mass agrees")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from biolit_id.server.inference.model_loader import load_model

    out = Path(args.out)
    try:
        data = read_embeddings(args.embeddings)
        loaded = load_model(args.model)
        data.check_model(loaded.fingerprint, loaded.embedding_dim, str(args.embeddings))
        if args.val is not None:
            train, val = data, read_embeddings(args.val)
            val.check_model(loaded.fingerprint, loaded.embedding_dim, str(args.val))
            split_info = {"mode": "given", "val_file": str(args.val),
                          "val_fingerprint": fingerprint(val)}
        else:
            rows = stratified_split(data.species, FRACTIONS, args.seed)
            train, val, test = (data.subset(r) for r in rows)
            split_dir = out / SPLIT_DIR
            for name, part in (("train", train), ("val", val), ("test", test)):
                write_embeddings(split_dir / f"{name}.parquet", part)
            split_info = {
                "mode": "stratified", "seed": args.seed, "fractions": list(FRACTIONS),
                "source": str(args.embeddings), "source_fingerprint": fingerprint(data),
                "counts": {"train": len(train), "val": len(val), "test": len(test)},
                "files": {n: f"{SPLIT_DIR}/{n}.parquet" for n in ("train", "val", "test")},
                "val_fingerprint": fingerprint(val), "test_fingerprint": fingerprint(test),
                "test_rows": rows[2].tolist(),
            }
    except DatasetError as exc:
        log.error("%s", exc)
        return 2
    if len(train) == 0:
        log.error("no training photos")
        return 2
    catalog = Catalog.load(args.catalog) if args.catalog else Catalog.load_default()
    tau = args.logit_adjust
    if tau is None:
        tau = FUSED_HEAD.logit_adjust if args.routing == "fused" else 0.0
    settings = dict(
        alpha=args.alpha, common_n=args.common if args.common is not None else 50,
        min_count=args.min_count, seed=args.seed, pca_dim=args.pca_dim,
        proto_iterations=args.prototype_iterations,
        head=HeadSettings(epochs=args.epochs, patience=args.patience,
                          batch_size=args.batch_size, lr=args.lr,
                          weight_decay=args.weight_decay, balanced=args.balanced,
                          rare_negatives=args.rare_negatives, logit_adjust=tau,
                          threads=args.threads),
        progress=not args.no_progress, head_min_count=args.head_min_count)
    if args.routing == "fused":
        bundle, calibration = build_crossfitted(train, val, loaded, catalog, args.folds,
                                                **settings)
        write_embeddings(out / CALIBRATION_FILE, calibration)
        bundle.training_fingerprint = fingerprint(train)  # what evaluate must refuse
        split_info["calibration"] = {"file": CALIBRATION_FILE, "rows": len(calibration),
                                     "share": CALIBRATION_SHARE,
                                     "fingerprint": fingerprint(calibration)}
    else:
        bundle = build_bundle(train, val, loaded, catalog, routing=args.routing, **settings)
    bundle.extra["split"] = split_info
    # Until calibrate fits them on the calibration fold: the simulated default.
    derived = simulated_rank_thresholds(bundle, catalog)
    bundle.taxon_thresholds, bundle.extra["rank_thresholds"] = derived.thresholds, derived.report
    if args.rank_heads:  # tools/training/rank_heads.py: the rows that have each rank, aligned
        train_rank_heads(bundle.whiten(train.embeddings), train.species, catalog,
                         settings=RankHeadSettings(seed=args.seed, threads=args.threads)
                         ).attach(bundle)
    bundle.save(out)
    v = bundle.metrics["validation"]
    head_acc = v["head_accuracy"]
    print(f"wrote bundle {out} (routing {bundle.routing}, {len(bundle.species)} species, "
          f"{len(bundle.common)} in the head, "
          f"whitening {bundle.prototype_dim}-d, T={bundle.temperature:.2f})")
    print(f"validation: prototype accuracy {v['prototype_accuracy']:.3f}"
          + (f", head accuracy {head_acc:.3f}" if head_acc is not None else "")
          + "; next: biolit-id calibrate --bundle " + str(out))
    families = bundle.extra.get("decision_families")
    if families:
        print("\n".join(family_lines(families["table"], families["chosen"])))
    return 0
