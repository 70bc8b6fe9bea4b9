"""Served with the imported seed bundle, Identify decides exactly as docs/seed-v4.md says.

The reference below is written from docs/seed-v4.md alone, on the raw seed files
(its own MLP class loaded with the seed's ``net.*`` state dict, the seed's
whitening, temperature and thresholds) and deliberately imports nothing from
``server.decision.rules`` or the scorers. The fused prototypes are read from
the bundle's tensor: the demo model's text tower is not BioCLIP's, so they
cannot come from the seed itself.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from biolit_id.cli.main import main as cli
from biolit_id.proto import identification_pb2 as pb
from biolit_id.server.decision.types import SEED_METHOD_NAMES, Method
from conftest import SEED_DIR, stub_for

CLASSIFIER = SEED_DIR / "best_model_top50.pth"
PROTOTYPES = SEED_DIR / "prototypes_v4.pt"
SEED_METHODS = ("classifier_top50", "classifier_top50_low", "prototypical_rare", "rejected")
# Points whose deciding probability is within float rounding of a threshold
# would be decided either way by any two implementations; none are sent.
AMBIGUOUS = 1e-6


def _load_raw(path: Path) -> dict:
    from numpy._core.multiarray import _reconstruct

    allowed = [_reconstruct, np.ndarray, np.dtype, np.dtypes.Float32DType]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True, map_location="cpu")


class SeedMLP(nn.Module):
    """docs/seed-v4.md's "Head", attribute ``net`` so the seed's keys load as they are."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 512), nn.GELU(), nn.Dropout(0.5),
            nn.Linear(512, 256), nn.GELU(), nn.Dropout(0.25), nn.Linear(256, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SeedReference:
    """docs/seed-v4.md's "Scoring" and "Routing", one image at a time."""

    def __init__(self, fused: np.ndarray) -> None:
        clf, protos = _load_raw(CLASSIFIER), _load_raw(PROTOTYPES)
        self.common = [clf["idx_to_species"][i] for i in range(clf["num_species"])]
        self.species = [protos["idx_to_species"][i] for i in range(protos["num_species"])]
        self.rare = set(self.species) - set(self.common)
        self.mlp = SeedMLP(clf["feature_dim"], clf["num_species"])
        self.mlp.load_state_dict(clf["classifier_state_dict"])
        self.mlp.eval()
        self.mu = torch.from_numpy(np.asarray(protos["whitening_mu"]))
        self.W = torch.from_numpy(np.asarray(protos["whitening_W"]))
        self.visual = protos["prototypes"].numpy()
        self.T = float(protos["temperature"])
        self.high = float(protos["seuil_top50"])
        self.low = float(protos["seuil_proto"])
        self.fused = torch.from_numpy(fused)

    def probabilities(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            x = torch.nn.functional.normalize(torch.from_numpy(f), dim=-1)
            p_common = torch.softmax(self.mlp(x).double(), dim=-1)
            w = torch.nn.functional.normalize((x - self.mu) @ self.W, dim=-1)
            p_proto = torch.softmax(self.T * (w.double() @ self.fused.double().T), dim=-1)
        return p_common.numpy(), p_proto.numpy()

    def decide(self, p_common: np.ndarray, p_proto: np.ndarray) -> tuple[str, str, float]:
        c_max, p_max = float(p_common.max()), float(p_proto.max())
        c_name = self.common[int(p_common.argmax())]
        p_name = self.species[int(p_proto.argmax())]
        if c_max >= self.high:
            return "classifier_top50", c_name, c_max
        if p_max >= self.low and p_name in self.rare:
            return "prototypical_rare", p_name, p_max
        if c_max >= self.low:
            return "classifier_top50_low", c_name, c_max
        return "rejected", "?", max(c_max, p_max)

    def ambiguous(self, p_common: np.ndarray, p_proto: np.ndarray) -> bool:
        c_sorted, p_sorted = np.sort(p_common)[::-1], np.sort(p_proto)[::-1]
        near = [abs(c_sorted[0] - self.high), abs(c_sorted[0] - self.low),
                abs(p_sorted[0] - self.low), c_sorted[0] - c_sorted[1], p_sorted[0] - p_sorted[1]]
        return min(near) < AMBIGUOUS


def query_embeddings(ref: SeedReference, rng: np.random.Generator) -> np.ndarray:
    """Points around the seed's prototypes, mapped back to embedding space, plus noise.

    ``w = (v - mu) @ W``: a prototype p maps back to ``mu + s * p @ pinv(W)``,
    s spreading points from near the mean (unsure) to far along p (sure).
    Noise and two-prototype blends move points across the thresholds, so
    every method occurs; random unit vectors probe the rest of the sphere.
    """
    back = ref.visual @ np.linalg.pinv(ref.W.numpy())
    mu = ref.mu.numpy()
    dim = back.shape[1]
    parts = []
    for s in (1.5, 3.0, 4.0, 8.0):
        for noise in (0.0, 0.3, 0.6):
            pts = mu + s * back
            parts.append(pts + rng.normal(0, noise / np.sqrt(dim), pts.shape))
    a, b = rng.integers(0, len(back), 500), rng.integers(0, len(back), 500)
    t = rng.uniform(0.2, 0.8, (500, 1))
    parts.append(mu + 4.0 * (t * back[a] + (1 - t) * back[b]))
    parts.append(rng.normal(size=(400, dim)))
    pts = np.concatenate(parts).astype(np.float32)
    return pts / np.linalg.norm(pts, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def seed_bundle(tmp_path_factory: pytest.TempPathFactory, demo_model_spec: str) -> Path:
    out = tmp_path_factory.mktemp("seed-bundle")
    code = cli(["import-seed", "--classifier", str(CLASSIFIER), "--prototypes", str(PROTOTYPES),
                "--model", demo_model_spec, "--out", str(out)])
    assert code == 0
    return out


def test_identify_matches_reference_rules(seed_bundle: Path, make_server) -> None:
    fused = load_file(str(seed_bundle / "weights.safetensors"))["prototypes"]
    ref = SeedReference(fused)
    candidates = query_embeddings(ref, np.random.default_rng(5))
    p_common, p_proto = ref.probabilities(candidates)
    keep = [i for i in range(len(candidates)) if not ref.ambiguous(p_common[i], p_proto[i])]
    assert len(keep) >= len(candidates) - 10, "too many points on a threshold"
    queries = candidates[keep]
    expected = [ref.decide(p_common[i], p_proto[i]) for i in keep]
    assert len(queries) >= 2000

    counts = Counter(method for method, _, _ in expected)
    for method in SEED_METHODS:
        assert counts[method] >= 100, f"{method} occurs only {counts[method]} times: {counts}"

    running = make_server(bundle=seed_bundle)
    stub = stub_for(running)
    requests = (pb.IdentifyRequest(embedding=q.tolist(), request_id=str(i))
                for i, q in enumerate(queries))
    responses = list(stub.IdentifyStream(requests, timeout=120))
    assert len(responses) == len(queries)

    # The service's enum -> the seed's names must be one-to-one for the comparison to mean much.
    assert len(set(SEED_METHOD_NAMES.values())) == len(SEED_METHOD_NAMES)
    assert set(SEED_METHODS) <= set(SEED_METHOD_NAMES.values())
    mismatches = []
    taxon_answers = 0
    for i, (resp, (method, species, conf)) in enumerate(zip(responses, expected, strict=True)):
        assert resp.request_id == str(i)
        assert not resp.HasField("error"), resp.error.message
        got = resp.decision
        got_method = SEED_METHOD_NAMES[Method(got.method)]
        got_species = got.species or "?"
        if method == "rejected" and got_method == "taxon" and not got.species:
            taxon_answers += 1  # the seed rejects; the bundle's rank thresholds answer a taxon
            continue
        if (got_method != method or got_species != species
                or abs(got.confidence - conf) > 1e-5):
            mismatches.append((i, method, species, conf, got_method, got_species, got.confidence))
    assert not mismatches, f"{len(mismatches)} of {len(queries)} differ, first: {mismatches[:5]}"
    assert taxon_answers > 0  # imported rank thresholds answer some of the seed's rejections
