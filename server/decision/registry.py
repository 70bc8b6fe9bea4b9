"""Which decision rule a bundle gets: its manifest's ``routing`` names one here.

A new rule (say per-rank heads) lives in its own module with a scorer class
(``server.decision.types.Scorer``) and adds one line to ``ROUTINGS``; nothing else
in the service or the tools needs to know about it. Bundles without a
``routing`` key are the seed's (``import-seed`` writes none), so they keep
the seed's cascade.
"""

from __future__ import annotations

from collections.abc import Callable

from biolit_id.server.decision.bundle import Bundle, BundleError
from biolit_id.server.decision.fused import FusedScorer
from biolit_id.server.decision.seed_cascade import SeedCascadeScorer
from biolit_id.server.decision.seed_v2 import SeedV2Scorer
from biolit_id.server.decision.types import Scorer
from biolit_id.server.decision.zero_shot import ZeroShotScorer

ROUTINGS: dict[str, Callable[[Bundle], Scorer]] = {
    "seed": SeedCascadeScorer,  # docs/seed-v4.md, "Routing", bit-exact
    "fused": FusedScorer,  # one calibrated distribution over every species
    "seed-v2": SeedV2Scorer,  # the seed's second generation: Proto-CLIP, then rank heads
}


def scorer_for(bundle: Bundle | None) -> Scorer:
    """The bundle's scorer; zero-shot without a bundle."""
    if bundle is None:
        return ZeroShotScorer()
    factory = ROUTINGS.get(bundle.routing)
    if factory is None:
        raise BundleError(f"bundle {bundle.bundle_id or ''} asks for routing "
                          f"{bundle.routing!r}; this service knows {sorted(ROUTINGS)}")
    return factory(bundle)
