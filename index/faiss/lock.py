"""Who may open a FAISS gallery directory: its servers together, or one rebuild alone.

Each server keeps its own copy of the index in memory, and ``gallery rebuild``
rewrites that index and its snapshot. So a server holds the directory's owner
lock shared and a rebuild holds it exclusive. The lock is an advisory ``flock``
that the kernel drops when the process dies, so a killed server leaves no
stale lock behind. The store keeps its own lock for ``gallery restore``
(index/store.py).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from biolit_id.index.base import GalleryInUseError

OWNER_LOCK = "gallery.owner.lock"


def lock_gallery(directory: Path, exclusive: bool = False) -> int:
    """Hold ``directory``'s owner lock; returns the fd to close when done.

    Raises GalleryInUseError at once rather than wait: a rebuild that found a
    server running, or a server that found a rebuild, should say so and stop.
    """
    fd = os.open(Path(directory) / OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        if exclusive:
            raise GalleryInUseError(
                f"the gallery in {directory} is in use by a running server (or another "
                "`gallery rebuild`); stop it first, since a rebuild needs the gallery to "
                "itself") from None
        raise GalleryInUseError(
            f"the gallery in {directory} is being rebuilt (`biolit-id gallery rebuild`); "
            "start the server once the rebuild has finished") from None
    return fd
