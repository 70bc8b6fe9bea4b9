"""What every decision rule shares: methods, thresholds, scores, the Scorer protocol, answers.

The pipeline, the tools and each rule import these from here, so a rule never
imports another rule or the pipeline to speak of its result.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from biolit_id.index.core.types import PrototypeSet, SimilarHit
from biolit_id.server.catalog.catalog import Catalog, SpeciesRecord

if TYPE_CHECKING:
    from biolit_id.server.decision.bundle import Bundle


class Method(enum.IntEnum):
    """Mirrors ``biolit.v1.Method`` value for value."""

    CLASSIFIER = 1
    CLASSIFIER_LOW = 2
    PROTOTYPE = 3
    ZERO_SHOT = 4
    REJECTED = 5
    TAXON = 6
    FUSED = 7
    OBSERVATION = 8


# The seed's CSV spelling of each method (docs/seed-v4.md, "Routing"), one-to-one.
SEED_METHOD_NAMES: dict[Method, str] = {
    Method.CLASSIFIER: "classifier_top50",
    Method.CLASSIFIER_LOW: "classifier_top50_low",
    Method.PROTOTYPE: "prototypical_rare",
    Method.REJECTED: "rejected",
    Method.ZERO_SHOT: "zero_shot",
    Method.TAXON: "taxon",
    Method.FUSED: "fused",
    Method.OBSERVATION: "observation",
}

# Zero-shot reject threshold on the text-prototype softmax (see README: it is
# a prior, not a calibrated value; ``biolit-id calibrate`` refits it).
DEFAULT_ZERO_SHOT_THRESHOLD = 0.30
ZERO_SHOT_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class Thresholds:
    classifier_high: float = 0.80  # seed's seuil_top50
    classifier_low: float = 0.40  # seed's seuil_proto, reused for the low band
    prototype: float = 0.40  # seed's seuil_proto
    zero_shot: float = DEFAULT_ZERO_SHOT_THRESHOLD
    # routing: fused — the cut on the answer's probability (calibrate fits it), and the
    # stricter cuts of photos whose mass lies on rare species or on species added at
    # runtime (None: the same cut as every photo).
    answer: float = 0.5
    answer_rare: float | None = None
    answer_runtime: float | None = None

    def group_cuts(self) -> np.ndarray:
        """The cut per photo group: common, rare, runtime (``SpeciesGroup`` order)."""
        return np.array([self.answer,
                         self.answer if self.answer_rare is None else self.answer_rare,
                         self.answer if self.answer_runtime is None else self.answer_runtime])


class SpeciesGroup(enum.IntEnum):
    """Where a photo's probability lies: the groups whose answers are risk-controlled apart."""

    COMMON = 0
    RARE = 1
    RUNTIME = 2


GROUP_MASS = 0.5  # a photo belongs to the rare (runtime) group when that much mass lies there


def photo_groups(distribution: np.ndarray, species_group: np.ndarray | None) -> np.ndarray:
    """[B] ``SpeciesGroup`` of each photo: runtime, else rare, where >= half its mass lies."""
    dist = np.atleast_2d(np.asarray(distribution, dtype=np.float64))
    groups = np.full(len(dist), int(SpeciesGroup.COMMON))
    if species_group is None or dist.shape[1] == 0:
        return groups
    for group in (SpeciesGroup.RARE, SpeciesGroup.RUNTIME):
        mass = dist[:, np.asarray(species_group) == group].sum(axis=1)
        groups[mass >= GROUP_MASS] = int(group)
    return groups


@dataclass(frozen=True)
class Routed:
    """Batch of decisions: ``species`` is a global index, -1 when rejected."""

    method: np.ndarray  # [B] int (Method values)
    species: np.ndarray  # [B] int
    confidence: np.ndarray  # [B] float64


@dataclass(frozen=True)
class RankAnswer:
    rank: str
    taxon: str
    confidence: float
    runner_up: str = ""
    runner_up_confidence: float = 0.0



@dataclass
class Identification:
    method: Method
    species: str  # "" when rejected or answered above species level
    confidence: float
    rank: str  # "species", "genus", ... or "" when rejected
    taxon: str
    classifier_candidates: list[tuple[str, float]]
    prototype_candidates: list[tuple[str, float]]
    record: SpeciesRecord | None  # taxonomy source for the answer
    rank_confidences: list[RankAnswer] = field(default_factory=list)
    similar: list[SimilarHit] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    # The decision's species distribution over ``names`` (observations combine these).
    distribution: np.ndarray | None = None
    names: tuple[str, ...] = ()


# (queries in the prototype space [B, P], species names) -> [B, n] similarity of each
# query to that species' nearest reference photos, NaN where it has none (server.decision.fused).
NeighbourFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class Scores:
    p_common: np.ndarray  # [B, C] over the head's classes (C = 0 without a head)
    p_proto: np.ndarray  # [B, S] over PrototypeSet.names
    common_to_global: np.ndarray  # [C] head class -> row of PrototypeSet
    routed: Routed
    distribution: np.ndarray  # [B, S] the decision's species distribution
    species_group: np.ndarray | None = None  # [S] SpeciesGroup of each species (fused)


class GenericRankAnswers:
    """For rules whose rank answers are the generic ones (the lineage mass): nothing to add."""

    owns_rank_answers = False

    def explain(self, result: Identification, scores: Scores, protos: PrototypeSet,
                catalog: Catalog, embedding: np.ndarray) -> Identification:
        return result


class Scorer(Protocol):
    """What the pipeline, the gallery and the tools need of a decision rule."""

    mode: str
    bundle: Bundle | None
    thresholds: Thresholds
    temperature: float
    alpha: float
    owns_rank_answers: bool  # True: explain() gives the rule's own rank answers (seed v2)

    def to_prototype_space(self, embeddings: np.ndarray) -> np.ndarray: ...

    def score(self, embeddings: np.ndarray, protos: PrototypeSet,
              allowed: np.ndarray | None = None,
              neighbours: NeighbourFn | None = None) -> Scores: ...

    def decide(self, scores: Scores, thresholds: Thresholds) -> Scores:
        """The same scores decided under other thresholds (calibration searches with it)."""
        ...

    def explain(self, result: Identification, scores: Scores, protos: PrototypeSet,
                catalog: Catalog, embedding: np.ndarray) -> Identification:
        """The generic answer (species, or a rank from the lineage mass) made this rule's:
        a rule with rank answers of its own rewrites them here; most return it as it is."""
        ...


