"""One ``AddExemplars`` stream's writes, a batch at a time (the servicer and ``bench`` share it).

A stream's photos are acknowledged together, by its single response, so they
can be stored in batches: one SQLite transaction or one Milvus upsert per
batch instead of one per photo. The response leaves only once the last batch
is durable; on an error, the batches before it stay stored and a client
re-sends the rest (adds are idempotent by content).
"""

from __future__ import annotations

from collections.abc import Sequence

from biolit_id.index.base import GalleryBase
from biolit_id.index.store import NewExemplar

WRITE_BATCH = 64  # photos per transaction (measured: docs/performance.md)


class StreamWriter:
    """Collects a stream's photos, writes them ``batch`` at a time, refreshes at the end."""

    def __init__(self, gallery: GalleryBase, batch: int = WRITE_BATCH) -> None:
        self.gallery = gallery
        self.batch = max(1, int(batch))
        self.ids: list[int] = []  # one per message, in message order
        self.touched: list[str] = []  # species that got a new photo
        self._pending: list[tuple[int, NewExemplar]] = []  # (message position, photo)

    def add(self, item: NewExemplar) -> None:
        self.ids.append(0)
        self._pending.append((len(self.ids) - 1, item))

    def add_stored(self, exemplar_id: int) -> None:
        """A message whose photo the gallery already holds (found before decoding it)."""
        self.ids.append(int(exemplar_id))

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.batch

    @property
    def pending_span(self) -> tuple[int, int] | None:
        """(first, last) message positions not written yet, for error messages."""
        return (self._pending[0][0], self._pending[-1][0]) if self._pending else None

    def write(self) -> None:
        """Store the pending photos in one batch (all or nothing), durable on return."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        outcomes = self.gallery.add_many([item for _, item in pending])
        for (position, _), outcome in zip(pending, outcomes, strict=True):
            self.ids[position] = outcome.exemplar_id
            if outcome.created and outcome.species not in self.touched:
                self.touched.append(outcome.species)

    def close(self) -> None:
        """Publish the touched species' prototypes; the stream ends either way."""
        self.gallery.refresh(self.touched)


def write_stream(gallery: GalleryBase, items: Sequence[NewExemplar],
                 batch: int = WRITE_BATCH) -> StreamWriter:
    """A whole stream of already-validated photos (bulk loads, benchmarks)."""
    writer = StreamWriter(gallery, batch)
    try:
        for item in items:
            writer.add(item)
            if writer.full:
                writer.write()
        writer.write()
    finally:
        writer.close()
    return writer
