"""Every served decision family of a trained bundle, as a bundle of its own.

``train`` keeps, for each candidate family, the weights fitted on all the
fitting rows (``decision_families.table[*].weights``). A variant is the
bundle with another family's weights (and, where that family uses the other
head, that head refitted on the same rows). ``bench-quality`` then runs
``calibrate`` on each with its defaults, on the fold train kept apart, so
every family is reported on the test photos, not only the one chosen.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from biolit_id.cli.training.crossfit import fitting_and_calibration
from biolit_id.cli.training.datasets import EmbeddingSet
from biolit_id.cli.training.head import FUSED_HEAD, fit_head_on
from biolit_id.cli.training.lda import LDA_HEAD, lda_head_state
from biolit_id.server.decision.bundle import DEFAULT_HEAD, Bundle, load_bundle


def served_head(bundle: Bundle) -> str:
    return (bundle.fusion or {}).get("head", "mlp")


def _with_head(bundle: Bundle, kind: str, train: EmbeddingSet, val: EmbeddingSet,
               seed: int) -> Bundle:
    """The bundle with its head refitted as ``kind`` on the rows train fitted it on."""
    fitting, _ = fitting_and_calibration(train, val, seed)
    index = {s: i for i, s in enumerate(bundle.species)}
    y = np.array([index.get(s, -1) for s in fitting.species], dtype=np.int64)
    head_ids = [index[s] for s in bundle.common]
    if kind == "lda":
        return replace(bundle, head_config=dict(LDA_HEAD), head_state=lda_head_state(
            fitting.embeddings, y, head_ids, bundle.whitening_mu, bundle.whitening_W))
    return replace(bundle, head_config=dict(DEFAULT_HEAD), head_state=fit_head_on(
        fitting.embeddings, y, head_ids, FUSED_HEAD, dict(DEFAULT_HEAD), seed))


def write_family_variants(bundle_dir: Path, train: EmbeddingSet, val: EmbeddingSet, seed: int,
                          out: Path) -> dict[str, Path]:
    """{family: bundle directory under ``out``} for every served family ``train`` recorded
    weights for; the chosen one is the bundle itself (its runtime terms included)."""
    bundle = load_bundle(bundle_dir)
    table = (bundle.extra.get("decision_families") or {}).get("table") or []
    heads = {served_head(bundle): bundle}
    written = {}
    for row in table:
        if not row.get("served") or "weights" not in row:
            continue
        kind = row.get("head", "mlp")
        if kind not in heads:
            heads[kind] = _with_head(bundle, kind, train, val, seed)
        base = heads[kind]
        variant = bundle if row["family"] == bundle.fusion.get("family") else replace(
            base, fusion={**base.fusion, "weights": row["weights"], "family": row["family"],
                          "head": kind})
        written[row["family"]] = variant.save(Path(out) / row["family"].replace("+", "-"))
    return written
