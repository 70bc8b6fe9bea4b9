"""A bundle's whole scoring and decision as one ONNX graph, for devices.

``export_decision(scorer, protos, catalog)`` writes what the service's own
scorer (``server.decision.registry.scorer_for``) computes over a prototype
set: input ``embedding`` [N, D] (unit rows, as the service's), outputs

* ``probabilities`` [N, S] float64: the decision's species distribution
  (``Scores.distribution``), columns in the order of the metadata ``species``;
* ``answer`` [N] int64: the species index, or -1 with no answer at species level;
* ``method`` [N] int64: ``server.decision.types.Method`` values (TAXON for a rank answer);
* ``confidence`` [N] float64: the answer's confidence, as the service reports it;
* ``rank`` [N] int64 and ``taxon`` [N] int64: the rank answer when there is no species,
  indices into the metadata ``ranks`` and ``taxa[rank]`` (-1 when none).

The graph follows the service's numbers step by step: float32 where the service
computes in float32 (whitening, the MLP head), float64 from the softmaxes on,
so that answers are identical and probabilities agree to ~1e-12.

One exporter per routing (``EXPORTERS``), as ``server.decision.registry.ROUTINGS``
has one scorer per routing; ``tests/test_device_decision.py`` runs every exporter
against the service's scorer on the same embeddings, so a change of a rule that
is not carried here fails there. Not exported: ``restrict_to`` masks, the
fused rule's nearest-photo term for species added at runtime (the prototype
cosine stands in, as it does in the service for a species without photos),
and trained rank heads beside a bundle's rule (``rank_heads_scorer``): the
rank answer here is the lineage-mass one.

``onnx`` is imported only when a graph is built (the ``[onnx]`` extra).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from biolit_id.index.core.types import PrototypeSet
from biolit_id.server.catalog.catalog import FALLBACK_RANKS, Catalog
from biolit_id.server.decision.ranks import taxon_of
from biolit_id.server.decision.types import GROUP_MASS, Method, Scorer, SpeciesGroup

OPSET = 18
IR_VERSION = 8  # what onnxruntime-web and every onnxruntime since 1.10 read
FORMAT = "biolit-id-decision/1"


class DecisionExportError(ValueError):
    """A scorer this module cannot write as a graph; the message says why."""


# ------------------------------------------------------------------ a small graph builder


class Graph:
    """Nodes and constants with generated names; ``op`` returns the output name(s)."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self._n = 0

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, value, dtype=None, name: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype)
        out = self._name(name)
        self.initializers.append(self.numpy_helper.from_array(arr, out))
        return out

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None,
           **attrs) -> str | list[str]:
        outs = [name] if name and outputs == 1 else [self._name(op_type.lower())
                                                      for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def f64(self, x: str) -> str:
        from onnx import TensorProto

        return self.op("Cast", x, to=TensorProto.DOUBLE)

    def softmax(self, x: str) -> str:
        return self.op("Softmax", x, axis=-1)

    def row_max(self, x: str) -> tuple[str, str]:
        """(argmax [N] int64, max [N]) of each row; ties go to the first column, as numpy."""
        idx = self.op("ArgMax", x, axis=1, keepdims=0)
        top = self.op("ReduceMax", x, self.const([1], np.int64), keepdims=0)
        return idx, top

    def identity(self, x: str, name: str) -> str:
        return self.op("Identity", x, name=name)


def _l2_rows_f32(g: Graph, x: str) -> str:
    """x / max(||x||, 1e-12) per row, float32 (``Bundle.whiten``'s last step)."""
    norm = g.op("Sqrt", g.op("ReduceSum", g.op("Mul", x, x), g.const([1], np.int64),
                             keepdims=1))
    return g.op("Div", x, g.op("Max", norm, g.const(1e-12, np.float32)))


def _whiten(g: Graph, x: str, scorer: Scorer) -> str:
    """``Bundle.whiten`` (float32): centre, project, normalise."""
    bundle = scorer.bundle
    if bundle.whitening_W is not None:
        x = g.op("MatMul", g.op("Sub", x, g.const(bundle.whitening_mu, np.float32)),
                 g.const(bundle.whitening_W, np.float32))
    return _l2_rows_f32(g, x)


def _cosines_f64(g: Graph, features_f32: str, protos: PrototypeSet) -> str:
    """[N, S] float64 cosines, as ``features.astype(f64) @ vectors.T.astype(f64)``."""
    return g.op("MatMul", g.f64(features_f32),
                g.const(np.asarray(protos.vectors, np.float32).astype(np.float64).T))


def _mlp_head_logits(g: Graph, x: str, scorer: Scorer) -> str:
    """``decision.head.Head.logits``: the torch Sequential in float32, then float64."""
    bundle = scorer.bundle
    config = bundle.head_config or {}
    from biolit_id.server.decision.bundle import DEFAULT_HEAD

    hidden = list(config.get("hidden", DEFAULT_HEAD["hidden"]))
    state = {k: np.asarray(v, np.float32) for k, v in bundle.head_state.items()}
    layer = 0
    if config.get("layernorm", True):
        x = g.op("LayerNormalization", x, g.const(state["0.weight"]), g.const(state["0.bias"]),
                 axis=-1, epsilon=1e-5)
        layer = 1
    for _ in hidden:
        x = g.op("Add", g.op("MatMul", x, g.const(state[f"{layer}.weight"].T)),
                 g.const(state[f"{layer}.bias"]))
        # nn.GELU(): 0.5 x (1 + erf(x / sqrt 2)), exact
        erf = g.op("Erf", g.op("Div", x, g.const(np.sqrt(2.0), np.float32)))
        x = g.op("Mul", g.op("Mul", x, g.const(0.5, np.float32)),
                 g.op("Add", erf, g.const(1.0, np.float32)))
        layer += 3  # Linear, GELU, Dropout
    x = g.op("Add", g.op("MatMul", x, g.const(state[f"{layer}.weight"].T)),
             g.const(state[f"{layer}.bias"]))
    return g.f64(x)


def _scatter_matrix(rows: np.ndarray, width: int) -> np.ndarray:
    """[len(rows), width] float64 with a 1 at (i, rows[i]): columns -> global columns."""
    out = np.zeros((len(rows), width))
    out[np.arange(len(rows)), rows] = 1.0
    return out


def _where_scalar(g: Graph, cond: str, value, other: str, dtype) -> str:
    return g.op("Where", cond, g.const(value, dtype), other)


# ------------------------------------------------------------------ the outputs


@dataclass
class Decision:
    """What an exporter leaves for the common tail (names of graph values)."""

    probabilities: str  # [N, S] float64
    answer: str  # [N] int64
    method: str  # [N] int64
    confidence: str  # [N] float64
    rank: str | None = None  # [N] int64, when the rule answers ranks itself (seed v2)
    taxon: str | None = None
    ranks: list[str] = field(default_factory=list)
    taxa: dict[str, list[str]] = field(default_factory=dict)
    rank_thresholds: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def _mass_fallback(g: Graph, d: Decision, scorer: Scorer, protos: PrototypeSet,
                   catalog: Catalog) -> Decision:
    """``decision.answers.explain``'s rank answer: with no species, the finest rank
    (``FALLBACK_RANKS``) whose lineage mass passes the bundle's threshold."""
    thresholds = dict(getattr(scorer.bundle, "taxon_thresholds", None) or {})
    ranks, taxa, mats = [], {}, []
    for rank in FALLBACK_RANKS:
        if rank not in thresholds:
            continue
        order: list[str] = []  # first appearance in species order: numpy's tie rule
        column: dict[str, int] = {}
        member = []
        for s, name in enumerate(protos.names):
            taxon = taxon_of(catalog.get(name), rank)
            if taxon:
                if taxon not in column:
                    column[taxon] = len(order)
                    order.append(taxon)
                member.append((s, column[taxon]))
        if not order:
            continue
        mat = np.zeros((len(protos.names), len(order)))
        for s, t in member:
            mat[s, t] = 1.0
        ranks.append(rank)
        taxa[rank] = order
        mats.append(mat)
    minus_one = _minus_ones(g, d.answer)
    rank_out, taxon_out, conf_out = minus_one, minus_one, d.confidence
    method_out = d.method
    no_species = g.op("Less", d.answer, g.const(0, np.int64))
    # Coarsest first, each finer rank overriding: the finest passing rank wins.
    for i in reversed(range(len(ranks))):
        masses = g.op("MatMul", d.probabilities, g.const(mats[i]))
        idx, top = g.row_max(masses)
        top = g.op("Min", top, g.const(1.0, np.float64))
        passes = g.op("And", no_species, g.op("GreaterOrEqual", top,
                                             g.const(thresholds[ranks[i]], np.float64)))
        rank_out = g.op("Where", passes, g.const(i, np.int64), rank_out)
        taxon_out = g.op("Where", passes, idx, taxon_out)
        conf_out = g.op("Where", passes, top, conf_out)
        method_out = g.op("Where", passes, g.const(int(Method.TAXON), np.int64), method_out)
    d.rank, d.taxon, d.confidence, d.method = rank_out, taxon_out, conf_out, method_out
    d.ranks, d.taxa = ranks, taxa
    d.rank_thresholds = {r: float(thresholds[r]) for r in ranks}
    return d


def _minus_ones(g: Graph, like: str) -> str:
    """[N] int64 of -1, shaped as ``like``."""
    return g.op("Sub", g.op("Mul", like, g.const(0, np.int64)), g.const(1, np.int64))


def _clip01(g: Graph, x: str) -> str:
    return g.op("Clip", x, g.const(0.0, np.float64), g.const(1.0, np.float64))


# ------------------------------------------------------------------ one exporter per routing


def export_zero_shot(g: Graph, x: str, scorer, protos: PrototypeSet, catalog: Catalog
                     ) -> Decision:
    """``ZeroShotScorer``: float32 cosine to the text prototypes, CLIP's logit scale."""
    sims = g.op("MatMul", x, g.const(np.asarray(protos.vectors, np.float32).T))
    p = g.softmax(g.op("Mul", g.f64(sims), g.const(float(scorer.logit_scale), np.float64)))
    idx, top = g.row_max(p)
    ok = g.op("GreaterOrEqual", top, g.const(scorer.thresholds.zero_shot, np.float64))
    answer = g.op("Where", ok, idx, g.const(-1, np.int64))
    method = g.op("Where", ok, g.const(int(Method.ZERO_SHOT), np.int64),
                  g.const(int(Method.REJECTED), np.int64))
    d = Decision(p, answer, method, _clip01(g, top))
    d.extra = {"logit_scale": float(scorer.logit_scale),
               "threshold": float(scorer.thresholds.zero_shot)}
    return _mass_fallback(g, d, scorer, protos, catalog)


def export_seed(g: Graph, x: str, scorer, protos: PrototypeSet, catalog: Catalog) -> Decision:
    """``SeedCascadeScorer``: ``rules.route_hybrid`` and ``rules.routed_distribution``."""
    bundle, th = scorer.bundle, scorer.thresholds
    n_species = len(protos.names)
    c2g = np.asarray(bundle.common_to_global(protos.names), dtype=np.int64)
    p_proto = g.softmax(g.op("Mul", _cosines_f64(g, _whiten(g, x, scorer), protos),
                             g.const(float(scorer.temperature), np.float64)))
    is_rare = np.ones(n_species, dtype=bool)
    is_rare[c2g] = False
    p_idx, p_max = g.row_max(p_proto)
    rare = g.op("Gather", g.const(is_rare), p_idx, axis=0)
    if len(c2g):
        p_common = g.softmax(_mlp_head_logits(g, x, scorer))
        c_idx, c_max = g.row_max(p_common)
        c_global = g.op("Gather", g.const(c2g), c_idx, axis=0)
        common_global = g.op("MatMul", p_common, g.const(_scatter_matrix(c2g, n_species)))
    else:
        zero_rows = g.op("Mul", p_max, g.const(0.0, np.float64))
        c_max, c_global = zero_rows, g.op("Sub", g.op("Mul", p_idx, g.const(0, np.int64)),
                                           g.const(1, np.int64))
        common_global = g.op("Mul", p_proto, g.const(0.0, np.float64))
    rule1 = g.op("GreaterOrEqual", c_max, g.const(th.classifier_high, np.float64))
    not1 = g.op("Not", rule1)
    rule2 = g.op("And", g.op("And", not1, g.op("GreaterOrEqual", p_max,
                                               g.const(th.prototype, np.float64))), rare)
    rule3 = g.op("And", g.op("And", not1, g.op("Not", rule2)),
                 g.op("GreaterOrEqual", c_max, g.const(th.classifier_low, np.float64)))
    classifier = g.op("Or", rule1, rule3)
    i64 = np.int64
    method = g.op("Where", rule3, g.const(int(Method.CLASSIFIER_LOW), i64),
                  g.op("Where", rule2, g.const(int(Method.PROTOTYPE), i64),
                       g.op("Where", rule1, g.const(int(Method.CLASSIFIER), i64),
                            g.const(int(Method.REJECTED), i64))))
    answer = g.op("Where", classifier, c_global,
                  g.op("Where", rule2, p_idx, g.const(-1, i64)))
    confidence = g.op("Where", classifier, c_max,
                      g.op("Where", rule2, p_max, g.op("Max", c_max, p_max)))
    # routed_distribution: classifier -> p_common on the globals; prototype -> p_proto;
    # rejected -> their mean; renormalised.
    cls2 = g.op("Unsqueeze", classifier, g.const([1], i64))
    rej2 = g.op("Unsqueeze", g.op("Equal", method, g.const(int(Method.REJECTED), i64)),
                g.const([1], i64))
    half = g.const(0.5, np.float64)
    mixed = g.op("Add", g.op("Mul", half, common_global), g.op("Mul", half, p_proto))
    dist = g.op("Where", cls2, common_global, g.op("Where", rej2, mixed, p_proto))
    total = g.op("ReduceSum", dist, g.const([1], i64), keepdims=1)
    positive = g.op("Greater", total, g.const(0.0, np.float64))
    dist = g.op("Div", dist, g.op("Where", positive, total, g.const(1.0, np.float64)))
    d = Decision(dist, answer, method, _clip01(g, confidence))
    d.extra = {"thresholds": {"classifier_high": th.classifier_high,
                              "classifier_low": th.classifier_low, "prototype": th.prototype},
               "temperature": float(scorer.temperature), "head_classes": len(c2g)}
    return _mass_fallback(g, d, scorer, protos, catalog)


def _group_cut(g: Graph, dist: str, scorer, protos: PrototypeSet) -> str:
    """[N] each photo's cut: its group's (``types.photo_groups``: runtime, else rare,
    where at least ``GROUP_MASS`` of its probability lies), as ``rules.route_fused``."""
    groups = scorer.species_groups(protos.names)
    cuts = scorer.thresholds.group_cuts()
    cut = g.const(np.full(1, cuts[SpeciesGroup.COMMON]))
    for group in (SpeciesGroup.RARE, SpeciesGroup.RUNTIME):
        mask = (groups == group).astype(np.float64)
        mass = g.op("MatMul", dist, g.const(mask))
        cut = g.op("Where", g.op("GreaterOrEqual", mass, g.const(GROUP_MASS, np.float64)),
                   g.const(np.full(1, cuts[group])), cut)
    return cut


def export_fused(g: Graph, x: str, scorer, protos: PrototypeSet, catalog: Catalog) -> Decision:
    """``FusedScorer`` as it scores without the nearest-photo term: ``fused_logits``,
    its softmax, ``rules.route_fused``."""
    from biolit_id.server.decision.fused import FusionWeights

    bundle, w = scorer.bundle, scorer.weights
    if not isinstance(w, FusionWeights):
        raise DecisionExportError("fused scorer without FusionWeights")
    n_species = len(protos.names)
    c2g = np.asarray(bundle.common_to_global(protos.names), dtype=np.int64)
    cos = _cosines_f64(g, _whiten(g, x, scorer), protos)
    log_prior = np.asarray(scorer.log_prior, dtype=np.float64)
    level = w.prior * float(log_prior.mean()) if len(log_prior) else 0.0
    # Species outside the head: novel_proto cos + novel_knn near (= cos) + offset + level.
    slope = np.full(n_species, w.novel_proto + w.novel_knn)
    offset = np.full(n_species, w.novel_offset + level)
    slope[c2g] = w.proto
    offset[c2g] = w.prior * log_prior
    z = g.op("Add", g.op("Mul", cos, g.const(slope[None, :])), g.const(offset[None, :]))
    if len(c2g):
        logits = _mlp_head_logits(g, x, scorer)
        # log_softmax as fused.log_softmax: z - max - log(sum(exp(z - max)))
        shifted = g.op("Sub", logits, g.op("ReduceMax", logits, g.const([1], np.int64),
                                           keepdims=1))
        log_p = g.op("Sub", shifted, g.op("Log", g.op("ReduceSum", g.op("Exp", shifted),
                                                      g.const([1], np.int64), keepdims=1)))
        head_term = g.op("MatMul", log_p, g.const(w.head * _scatter_matrix(c2g, n_species)))
        z = g.op("Add", z, head_term)
    dist = g.softmax(z)
    idx, top = g.row_max(dist)
    ok = g.op("And", g.op("GreaterOrEqual", top, _group_cut(g, dist, scorer, protos)),
              g.op("Greater", top, g.const(0.0, np.float64)))
    answer = g.op("Where", ok, idx, g.const(-1, np.int64))
    method = g.op("Where", ok, g.const(int(Method.FUSED), np.int64),
                  g.const(int(Method.REJECTED), np.int64))
    d = Decision(dist, answer, method, _clip01(g, top))
    d.extra = {"weights": w.to_json(), "answer_threshold": float(scorer.thresholds.answer),
               "group_cuts": scorer.thresholds.group_cuts().tolist(),
               "head_classes": len(c2g), "knn_term": "prototype cosine stands in"}
    return _mass_fallback(g, d, scorer, protos, catalog)


def export_seed_v2(g: Graph, x: str, scorer, protos: PrototypeSet, catalog: Catalog
                   ) -> Decision:
    """``SeedV2Scorer``: Proto-CLIP, then the rank heads walked as ``seed_v2.decide`` does."""
    settings, heads = scorer.settings, scorer.heads
    threshold, margin = float(settings.threshold), float(settings.margin)
    fw = _whiten(g, x, scorer)
    p_proto = g.softmax(g.op("Mul", _cosines_f64(g, fw, protos),
                             g.const(float(scorer.temperature), np.float64)))
    fw64 = g.f64(fw)
    i64 = np.int64

    def top2_ok(p: str, width: int) -> tuple[str, str, str]:
        """(argmax, top-1, passes threshold and margin) per row."""
        if width > 1:
            values, indices = g.op("TopK", p, g.const([2], i64), axis=1, largest=1, sorted=1,
                                   outputs=2)
            first = g.op("Gather", values, g.const(0, i64), axis=1)
            second = g.op("Gather", values, g.const(1, i64), axis=1)
            idx = g.op("Gather", indices, g.const(0, i64), axis=1)
        else:
            idx, first = g.row_max(p)
            second = g.op("Mul", first, g.const(0.0, np.float64))
        ok = g.op("And", g.op("GreaterOrEqual", first, g.const(threshold, np.float64)),
                  g.op("GreaterOrEqual", g.op("Sub", first, second),
                       g.const(margin, np.float64)))
        ok = g.op("And", ok, g.op("Greater", first, g.const(0.0, np.float64)))
        return idx, first, ok

    idx, p1, species_ok = top2_ok(p_proto, len(protos.names))
    answer = g.op("Where", species_ok, idx, g.const(-1, i64))
    method = g.op("Where", species_ok, g.const(int(Method.PROTOTYPE), i64),
                  g.const(int(Method.REJECTED), i64))
    confidence = g.op("Where", species_ok, p1, g.const(0.0, np.float64))
    open_rows = g.op("Not", species_ok)
    rank_out = taxon_out = _minus_ones(g, answer)
    ranks = [r for r in settings.walk if r in heads.heads]
    for i, rank in enumerate(ranks):
        head = heads.heads[rank]
        s = {k: np.asarray(v, dtype=np.float64) for k, v in head.state.items()}
        h = g.op("Add", g.op("MatMul", fw64, g.const(s["0.weight"].T)), g.const(s["0.bias"]))
        # (h - mean) / sqrt(var + eps) * weight + bias, in the service's order of operations
        h = g.op("Div", g.op("Sub", h, g.const(s["1.running_mean"])),
                 g.const(np.sqrt(s["1.running_var"] + head.eps)))
        h = g.op("Max", g.op("Add", g.op("Mul", g.const(s["1.weight"]), h),
                             g.const(s["1.bias"])), g.const(0.0, np.float64))
        logits = g.op("Add", g.op("MatMul", h, g.const(s["4.weight"].T)), g.const(s["4.bias"]))
        q = g.softmax(logits)
        q_idx, q1, q_ok = top2_ok(q, len(head.labels))
        hit = g.op("And", open_rows, q_ok)
        method = g.op("Where", hit, g.const(int(Method.TAXON), i64), method)
        confidence = g.op("Where", hit, q1, confidence)
        rank_out = g.op("Where", hit, g.const(i, i64), rank_out)
        taxon_out = g.op("Where", hit, q_idx, taxon_out)
        open_rows = g.op("And", open_rows, g.op("Not", q_ok))
    d = Decision(p_proto, answer, method, _clip01(g, confidence), rank_out, taxon_out,
                 ranks, {r: list(heads.heads[r].labels) for r in ranks},
                 {r: threshold for r in ranks})
    d.extra = {"threshold": threshold, "margin": margin, "walk": list(ranks),
               "temperature": float(scorer.temperature)}
    return d


Exporter = Callable[[Graph, str, Scorer, PrototypeSet, Catalog], Decision]
# scorer.mode -> exporter (the modes of server.decision.registry's scorers)
EXPORTERS: dict[str, Exporter] = {
    "zero-shot": export_zero_shot,
    "hybrid": export_seed,  # routing: seed
    "fused": export_fused,
    "seed-v2": export_seed_v2,
}
OUTPUTS = ("probabilities", "answer", "method", "confidence", "rank", "taxon")


def export_decision(scorer: Scorer, protos: PrototypeSet, catalog: Catalog,
                    metadata: dict[str, str] | None = None):
    """The decision of ``scorer`` over ``protos`` as an ``onnx.ModelProto``."""
    from onnx import TensorProto, checker, helper, shape_inference

    inner = getattr(scorer, "inner", scorer)  # rank heads beside a rule: the rule's graph
    exporter = EXPORTERS.get(inner.mode)
    if exporter is None:
        raise DecisionExportError(f"no graph exporter for decision mode {inner.mode!r} "
                                  f"(known: {sorted(EXPORTERS)})")
    if not len(protos.names):
        raise DecisionExportError("no species to decide among")
    dim = int(getattr(inner.bundle, "embedding_dim", 0) or 0) or (
        int(np.asarray(protos.vectors).shape[1]))
    g = Graph()
    x = "embedding"
    d = exporter(g, x, inner, protos, catalog)
    g.identity(d.probabilities, "probabilities")
    g.identity(d.answer, "answer")
    g.identity(d.method, "method")
    g.identity(d.confidence, "confidence")
    g.identity(d.rank or _minus_ones(g, d.answer), "rank")
    g.identity(d.taxon or _minus_ones(g, d.answer), "taxon")
    n, s = "N", len(protos.names)
    graph = helper.make_graph(
        g.nodes, "biolit_decision",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, dim])],
        [helper.make_tensor_value_info("probabilities", TensorProto.DOUBLE, [n, s]),
         *[helper.make_tensor_value_info(name, TensorProto.INT64, [n])
           for name in ("answer", "method")],
         helper.make_tensor_value_info("confidence", TensorProto.DOUBLE, [n]),
         *[helper.make_tensor_value_info(name, TensorProto.INT64, [n])
           for name in ("rank", "taxon")]],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="biolit-id", ir_version=IR_VERSION)
    bundle = inner.bundle
    meta = {
        "format": FORMAT,
        "routing": getattr(bundle, "routing", "") if bundle is not None else "zero-shot",
        "mode": inner.mode,
        "species": json.dumps(list(protos.names), ensure_ascii=False),
        "ranks": json.dumps(d.ranks),
        "taxa": json.dumps(d.taxa, ensure_ascii=False),
        "rank_thresholds": json.dumps(d.rank_thresholds),
        "methods": json.dumps({int(m): m.name for m in Method}),
        "embedding_dim": str(dim),
        "bundle_id": getattr(bundle, "bundle_id", "") if bundle is not None else "",
        "model_fingerprint": getattr(bundle, "model_fingerprint", "") if bundle else "",
        "prototype_version": str(protos.version),
        "parameters": json.dumps(d.extra),
        **(metadata or {}),
    }
    helper.set_model_props(model, meta)
    checker.check_model(model)
    # onnxruntime-web checks declared shapes strictly: so does the export.
    shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return model


def export_decision_bytes(scorer: Scorer, protos: PrototypeSet, catalog: Catalog,
                          metadata: dict[str, str] | None = None) -> bytes:
    return export_decision(scorer, protos, catalog, metadata).SerializeToString()


def bundle_prototypes(bundle) -> PrototypeSet:
    """The prototype set a service starts with for ``bundle`` (``server.wiring``'s)."""
    return PrototypeSet(tuple(bundle.species), bundle.prototypes.astype(np.float32), version=0)


def metadata_of(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def names_of(meta: dict[str, str], key: str = "species") -> Sequence[str]:
    return json.loads(meta[key])
