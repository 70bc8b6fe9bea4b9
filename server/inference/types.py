"""What a caller asks the pipeline for: options per photo, and the similar-photo search."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from biolit_id.index.core.types import SimilarHit

DEFAULT_TOP_K = 5
MAX_TOP_K = 1000
MAX_NUM_SIMILAR = 100
MAX_RESTRICT_TO = 500



@dataclass(frozen=True)
class IdentifyOptions:
    top_k: int = DEFAULT_TOP_K
    num_similar: int = 0
    restrict_to: tuple[str, ...] = ()
    include_thumbnails: bool = False



SimilarSearch = Callable[[np.ndarray, int, bool], list[list[SimilarHit]]]


