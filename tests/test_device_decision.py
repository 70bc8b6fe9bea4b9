"""The decision as an ONNX graph (``server.device.decision_graph``) against the service's own.

For each routing the exported graph and the service's scorer
(``registry.scorer_for(bundle).score``, then ``answers.explain`` for the rank
answer) see the same 200 embeddings: the answers must be identical and the
probabilities within 1e-5. When a rule changes in ``server/decision`` and
the exporter does not follow, this test says so.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from biolit_id.cli.main import main as cli
from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.catalog.catalog import Catalog
from biolit_id.server.decision.answers import explain
from biolit_id.server.decision.bundle import DEFAULT_HEAD, Bundle, load_bundle
from biolit_id.server.decision.fused import FusionWeights
from biolit_id.server.decision.head import build_head, head_state_from_module
from biolit_id.server.decision.registry import scorer_for
from biolit_id.server.decision.types import Method, Thresholds
from biolit_id.server.decision.zero_shot import ZeroShotScorer
from biolit_id.server.device.decision_graph import (
    bundle_prototypes,
    export_decision,
    metadata_of,
)
from conftest import SEED_V2_DIR

ort = pytest.importorskip("onnxruntime")
N = 200
CATALOG = Catalog.load_default()


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near_prototypes(bundle: Bundle, n: int, seed: int, spread=(0.0, 3.0)) -> np.ndarray:
    """Raw embeddings whose whitened image lies near the prototypes (and between them),
    plus random ones: every rule of the cascade gets rows."""
    rng = np.random.default_rng(seed)
    protos = bundle.prototypes.astype(np.float64)
    back = (np.linalg.pinv(bundle.whitening_W.astype(np.float64))
            if bundle.whitening_W is not None else None)
    rows = []
    for i in range(n):
        if i % 5 == 4:
            rows.append(rng.normal(size=bundle.embedding_dim))
            continue
        a, b = rng.integers(len(protos), size=2)
        mix = rng.uniform(0.5, 1.0)
        target = mix * protos[a] + (1 - mix) * protos[b]
        target = target + rng.uniform(*spread) * rng.normal(size=target.shape) / np.sqrt(
            len(target))
        rows.append(bundle.whitening_mu[0] + target @ back if back is not None else target)
    return unit(np.asarray(rows))


def run_graph(model, embeddings: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"embedding": embeddings}), strict=True))


def row_of(scores, i: int):
    """Row ``i`` of a batch's Scores (every per-photo array sliced, the rest kept)."""
    from dataclasses import fields

    def cut(value):
        if isinstance(value, np.ndarray) and value.ndim and len(value) == batch:
            return value[i:i + 1]
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if hasattr(value, "__dataclass_fields__"):
            return replace(value, **{f.name: cut(getattr(value, f.name))
                                     for f in fields(value)})
        return value

    batch = len(scores.distribution)
    return replace(scores, **{f.name: cut(getattr(scores, f.name)) for f in fields(scores)
                              if f.name != "common_to_global"})


def service_rank_answers(scorer, protos: PrototypeSet, embeddings: np.ndarray, scores, meta
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(method, confidence, rank index, taxon index) per row, from the service's explain."""
    import json

    ranks, taxa = json.loads(meta["ranks"]), json.loads(meta["taxa"])
    method, conf, rank, taxon = [], [], [], []
    for i, row in enumerate(embeddings):
        one = row_of(scores, i)
        result = explain(one, protos, CATALOG, scorer.bundle, 5)
        result = scorer.explain(result, one, protos, CATALOG, row[None, :])
        method.append(int(result.method))
        conf.append(result.confidence)
        if not result.species and result.rank:
            rank.append(ranks.index(result.rank))
            taxon.append(taxa[result.rank].index(result.taxon))
        else:
            rank.append(-1)
            taxon.append(-1)
    return np.array(method), np.array(conf), np.array(rank), np.array(taxon)


def check_equal(scorer, protos: PrototypeSet, embeddings: np.ndarray) -> dict:
    model = export_decision(scorer, protos, CATALOG)
    out = run_graph(model, embeddings)
    scores = scorer.score(embeddings, protos)
    np.testing.assert_array_equal(out["answer"], scores.routed.species)
    diff = float(np.abs(out["probabilities"] - scores.distribution).max())
    assert diff <= 1e-5, diff
    meta = metadata_of(model)
    method, conf, rank, taxon = service_rank_answers(scorer, protos, embeddings, scores, meta)
    np.testing.assert_array_equal(out["method"], method)
    np.testing.assert_array_equal(out["rank"], rank)
    np.testing.assert_array_equal(out["taxon"], taxon)
    np.testing.assert_allclose(out["confidence"], conf, atol=1e-5)
    import json

    assert json.loads(meta["species"]) == list(protos.names)
    return {"max_diff": diff, "methods": {Method(m).name: int((method == m).sum())
                                          for m in np.unique(method)}}


# ------------------------------------------------------------------ bundles


@pytest.fixture(scope="module")
def seed_v4(seed_bundle: Path) -> Bundle:
    bundle = load_bundle(seed_bundle)
    # Rank answers need thresholds; the seed has none (calibrate fits them).
    bundle.taxon_thresholds = {"genus": 0.5, "family": 0.6, "order": 0.7}
    return bundle


@pytest.fixture(scope="module")
def seed_v2(tmp_path_factory) -> Bundle:
    from biolit_id.cli.seedcompat.import_v2 import import_seed_v2

    model = SimpleNamespace(spec="test:bioclip-2", fingerprint="f" * 16, embedding_dim=768)
    bundle = import_seed_v2(SEED_V2_DIR / "proto_model.npz", SEED_V2_DIR / "mlp_model.pt",
                            SEED_V2_DIR / "tax_lookup.pkl", "test:bioclip-2", model=model)
    return load_bundle(bundle.save(tmp_path_factory.mktemp("v2")))


def fused_bundle(dim: int = 64, proto_dim: int = 32, head: int = 12, seed: int = 0) -> Bundle:
    """A whitened fused bundle over real catalog species (so ranks have lineages)."""
    rng = np.random.default_rng(seed)
    species = CATALOG.names()[:40]
    protos = unit(rng.normal(size=(len(species), proto_dim)))
    torch.manual_seed(seed)
    state = head_state_from_module(build_head(dim, head, DEFAULT_HEAD))
    weights = FusionWeights(proto=12.0, head=0.8, prior=0.3, novel_proto=11.0, novel_knn=2.0,
                            novel_offset=-3.0)
    return Bundle(
        model_id="test", model_fingerprint="", embedding_dim=dim, species=species,
        common=species[:head], head_config=dict(DEFAULT_HEAD), head_state=state,
        visual_prototypes=protos, text_prototypes=protos, prototypes=protos,
        whitening_mu=rng.normal(size=(1, dim)).astype(np.float32) * 0.05,
        whitening_W=rng.normal(size=(dim, proto_dim)).astype(np.float32),
        temperature=10.0, alpha=1.0, thresholds=Thresholds(answer=0.55), routing="fused",
        taxon_thresholds={"genus": 0.5, "family": 0.6, "order": 0.65, "class": 0.7},
        fusion={"weights": weights.to_json(),
                "head_log_prior": np.log(rng.dirichlet(np.ones(head))).tolist()},
    )


# ------------------------------------------------------------------ the tests


def test_seed_v4_graph_equals_the_service(seed_v4: Bundle):
    scorer = scorer_for(seed_v4)
    assert scorer.mode == "hybrid"
    report = check_equal(scorer, bundle_prototypes(seed_v4), near_prototypes(seed_v4, N, 1))
    assert len(report["methods"]) >= 3, report  # several rules of the cascade answered


def test_seed_v2_graph_equals_the_service(seed_v2: Bundle):
    with np.load(SEED_V2_DIR / "bioclip_features.npz", allow_pickle=False) as npz:
        real = np.asarray(npz["features"], dtype=np.float32)
    rng = np.random.default_rng(2)
    noisy = real[rng.integers(len(real), size=N - len(real))]
    noisy = noisy + rng.normal(scale=0.02, size=noisy.shape).astype(np.float32)
    embeddings = unit(np.concatenate([real, noisy]))
    scorer = scorer_for(seed_v2)
    report = check_equal(scorer, bundle_prototypes(seed_v2), embeddings)
    assert {"PROTOTYPE", "TAXON"} <= set(report["methods"]), report


def test_seed_v2_at_production_thresholds(seed_v2: Bundle):
    from biolit_id.server.decision.seed_v2 import MANIFEST_KEY

    section = {**seed_v2.extra[MANIFEST_KEY], "threshold": 0.35, "margin": 0.05}
    bundle = replace(seed_v2, extra={**seed_v2.extra, MANIFEST_KEY: section})
    with np.load(SEED_V2_DIR / "bioclip_features.npz", allow_pickle=False) as npz:
        real = unit(npz["features"])
    check_equal(scorer_for(bundle), bundle_prototypes(bundle), real)


def test_fused_graph_equals_the_current_fused_scorer():
    bundle = fused_bundle()
    scorer = scorer_for(bundle)
    assert scorer.mode == "fused"
    report = check_equal(scorer, bundle_prototypes(bundle),
                         near_prototypes(bundle, N, 3, spread=(0.0, 1.5)))
    assert {"FUSED", "REJECTED"} <= set(report["methods"]), report


def test_fused_graph_with_an_lda_head_equals_the_service():
    """A bundle whose decision family is ``lda``: its head has no hidden layer."""
    from biolit_id.cli.train import serve_lda_head

    bundle = fused_bundle(seed=2)
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(12), 20)
    x = unit(rng.normal(size=(12, 64))[y] + 0.5 * rng.normal(size=(len(y), 64)))
    serve_lda_head(bundle, x.astype(np.float32), y, list(range(12)))
    assert bundle.head_config["hidden"] == [] and set(bundle.head_state) == {"0.weight", "0.bias"}
    report = check_equal(scorer_for(bundle), bundle_prototypes(bundle), unit(
        np.vstack([x[::4], near_prototypes(bundle, N - len(x[::4]), 6, spread=(0.0, 1.5))])))
    assert {"FUSED", "REJECTED"} <= set(report["methods"]), report


def test_fused_graph_cuts_each_photo_by_its_group():
    """Per-group cuts (rare and runtime stricter) and a species added at runtime."""
    from dataclasses import replace

    bundle = fused_bundle(seed=1)
    bundle = replace(bundle, thresholds=Thresholds(answer=0.3, answer_rare=0.6,
                                                   answer_runtime=0.8),
                     extra={"groups": {"common": bundle.species[:20]}})
    base = bundle_prototypes(bundle)
    extra = unit(np.random.default_rng(2).normal(size=(1, base.vectors.shape[1])))
    protos = PrototypeSet((*base.names, "Runtime species"),
                          np.vstack([base.vectors, extra]).astype(np.float32), version=2)
    scorer = scorer_for(bundle)
    assert set(scorer.species_groups(protos.names).tolist()) == {0, 1, 2}
    report = check_equal(scorer, protos, near_prototypes(bundle, N, 5, spread=(0.0, 1.5)))
    assert {"FUSED", "REJECTED"} <= set(report["methods"]), report


def test_zero_shot_graph_equals_the_service(loaded_demo_model):
    from biolit_id.server.inference.text_prototypes import TextPrototypeCache

    names = CATALOG.names()[:30]
    vectors = TextPrototypeCache(loaded_demo_model, None).embed(
        [CATALOG.get(n).prompt() for n in names])
    protos = PrototypeSet(tuple(names), vectors, version=3)
    scorer = ZeroShotScorer(Thresholds(zero_shot=0.05))
    rng = np.random.default_rng(4)
    embeddings = unit(vectors[rng.integers(len(names), size=N)]
                      + rng.normal(scale=0.04, size=(N, vectors.shape[1])))
    report = check_equal(scorer, protos, embeddings)
    assert "ZERO_SHOT" in report["methods"], report


def test_export_decision_command(seed_bundle: Path, tmp_path: Path):
    import onnx

    out = tmp_path / "decision.onnx"
    assert cli(["export-decision", "--bundle", str(seed_bundle), "--out", str(out)]) == 0
    model = onnx.load(str(out))
    meta = metadata_of(model)
    assert meta["routing"] == "seed" and meta["bundle_id"] == load_bundle(seed_bundle).bundle_id
    assert [i.name for i in model.graph.input] == ["embedding"]
    assert [o.name for o in model.graph.output][:2] == ["probabilities", "answer"]
