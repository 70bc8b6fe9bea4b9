"""How many cores the model and the searches get, set once and deliberately.

One model forward at a time uses every core (the micro-batcher makes the
batches big instead of running several models side by side); FAISS gets its
own count because searches run in gRPC threads next to the model.
"""

from __future__ import annotations

import os

_model_threads = 0  # 0 = one per available core; set by configure_threads()


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int) -> int:
    return threads if threads > 0 else available_cores()


def configure_threads(model_threads: int = 0, search_threads: int = 0) -> dict[str, int]:
    """Set torch's and FAISS's thread pools; returns what was set, for logs and the bench."""
    global _model_threads
    _model_threads = resolve_threads(model_threads)
    search = resolve_threads(search_threads)
    import torch  # heavy: only when a server or tool actually configures itself

    torch.set_num_threads(_model_threads)
    try:
        import faiss

        faiss.omp_set_num_threads(search)
    except ImportError:  # faiss is a base dependency; tolerate odd installs
        pass
    return {"model_threads": _model_threads, "search_threads": search}


def model_threads() -> int:
    """Threads an exported runtime's session should use."""
    return _model_threads or available_cores()
