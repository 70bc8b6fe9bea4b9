"""Every served decision family of a trained bundle, calibrated as ``calibrate`` would.

``train`` keeps, for each candidate family, the weights fitted on all the
fitting rows (``decision_families.table[*].weights``). A variant is the
bundle with another family's weights (and, where that family uses the other
head, that head refitted on the same rows), then ``calibrate`` with its
defaults on the fold train kept apart — so ``bench-quality`` can report
every family on the test photos, not only the one chosen out of fold.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from biolit_id.cli.training.datasets import EmbeddingSet, read_embeddings
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.bundle import DEFAULT_HEAD, Bundle


def served_head(bundle: Bundle) -> str:
    return (bundle.fusion or {}).get("head", "mlp")


def _with_head(bundle: Bundle, kind: str, train: EmbeddingSet, val: EmbeddingSet,
               seed: int) -> Bundle:
    """The bundle with its head refitted as ``kind`` on the rows train fitted it on."""
    from biolit_id.cli.train import fit_head_on, fitting_and_calibration
    from biolit_id.cli.training.head import FUSED_HEAD
    from biolit_id.cli.training.lda import LDA_HEAD, lda_head_state

    fitting, _ = fitting_and_calibration(train, val, seed)
    index = {s: i for i, s in enumerate(bundle.species)}
    y = np.array([index.get(s, -1) for s in fitting.species], dtype=np.int64)
    head_ids = [index[s] for s in bundle.common]
    if kind == "lda":
        return replace(bundle, head_config=dict(LDA_HEAD), head_state=lda_head_state(
            fitting.embeddings, y, head_ids, bundle.whitening_mu, bundle.whitening_W))
    other = replace(bundle, head_config=dict(DEFAULT_HEAD))
    return replace(other, head_state=fit_head_on(fitting.embeddings, y, head_ids, FUSED_HEAD,
                                                 other, seed))


def family_variants(bundle_dir: Path, train: EmbeddingSet, val: EmbeddingSet, seed: int,
                    catalog: Catalog) -> dict[str, Bundle]:
    """{family: calibrated bundle} for every served family ``train`` recorded weights for."""
    from biolit_id.cli.calibrate import DEFAULT_COVERAGE, calibrate
    from biolit_id.server.decision.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    table = (bundle.extra.get("decision_families") or {}).get("table") or []
    cal = read_embeddings(Path(bundle_dir) / "split" / "calibration.parquet")
    heads = {served_head(bundle): bundle}
    out = {}
    for row in table:
        if not row.get("served") or "weights" not in row:
            continue
        kind = row.get("head", "mlp")
        if kind not in heads:
            heads[kind] = _with_head(bundle, kind, train, val, seed)
        base = heads[kind]
        chosen = row["family"] == bundle.fusion.get("family")
        variant = bundle if chosen else replace(  # the chosen one keeps its runtime terms
            base, fusion={**base.fusion, "weights": row["weights"], "family": row["family"],
                          "head": kind})
        out[row["family"]], _ = calibrate(variant, cal.embeddings, cal.species, catalog,
                                          target_coverage=DEFAULT_COVERAGE)
    return out
