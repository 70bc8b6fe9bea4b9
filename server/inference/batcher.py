"""Dynamic micro-batching: concurrent calls share one model forward.

On a CPU one forward over several photos costs far less than one per photo,
so photos from concurrent calls and a stream's read-ahead are queued and run
together by one thread; callers decode in their own threads meanwhile. The
queue is bounded and expired photos are dropped, so overload fails fast. The
wait is spent only while announced photos are still decoding. Deadlines are
``time.monotonic()`` values set by ``request_scope``, so the pipeline need not
know gRPC. Policy and measurements: docs/performance.md.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(RuntimeError):
    """Too many photos already wait for the model: retry later (RESOURCE_EXHAUSTED)."""


class DeadlineExceededError(TimeoutError):
    """The caller's deadline passed before its photo reached the model."""


class BatcherClosedError(RuntimeError):
    """The service is shutting down."""


@dataclass
class _Scope:
    deadline: float | None
    batcher: MicroBatcher | None = None
    pending: bool = False  # announced to ``batcher``, not submitted yet
    queue_seconds: float = 0.0  # time this request's photos waited for their batch


_SCOPE: ContextVar[_Scope | None] = ContextVar("biolit_request_scope", default=None)


@contextlib.contextmanager
def deadline_scope(deadline: float | None) -> Iterator[None]:
    """Make ``deadline`` (monotonic seconds) the default for submits in this context."""
    token = _SCOPE.set(_Scope(deadline))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def current_queue_ms() -> float:
    """How long the current request's photos waited for the model, in ms."""
    scope = _SCOPE.get()
    return scope.queue_seconds * 1e3 if scope is not None else 0.0


def current_deadline() -> float | None:
    scope = _SCOPE.get()
    return scope.deadline if scope is not None else None


def grpc_deadline(context) -> float | None:
    """A gRPC call's deadline as an absolute monotonic time (None = no deadline)."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is None or remaining > 1e8:  # grpc reports "no deadline" as huge
        return None
    return time.monotonic() + remaining


@dataclass
class _Item:
    pixels: np.ndarray
    deadline: float | None
    enqueued: float
    future: Future = field(default_factory=Future)


@dataclass
class BatcherStats:
    """Counters since start; the benchmark reads them for per-stage times."""

    batches: int = 0
    rows: int = 0
    expired: int = 0
    rejected: int = 0
    cancelled: int = 0
    failed_batches: int = 0
    model_seconds: float = 0.0
    queue_seconds: float = 0.0  # summed over photos: enqueue -> batch start
    batch_sizes: dict[int, int] = field(default_factory=dict)

    def snapshot(self) -> dict:
        rows = max(1, self.rows)
        batches = max(1, self.batches)
        return {
            "batches": self.batches,
            "photos": self.rows,
            "mean_batch_size": self.rows / batches,
            "model_ms_per_batch": self.model_seconds * 1e3 / batches,
            "model_ms_per_photo": self.model_seconds * 1e3 / rows,
            "queue_ms_per_photo": self.queue_seconds * 1e3 / rows,
            "expired": self.expired,
            "rejected": self.rejected,
            "cancelled": self.cancelled,
            "failed_batches": self.failed_batches,
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
        }


class MicroBatcher:
    """One thread runs ``embed`` on batches built from concurrent submits."""

    def __init__(
        self,
        embed: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int = 8,
        max_batch_wait_ms: float = 5.0,
        max_queue_size: int = 64,
        name: str = "embed-batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self._embed = embed
        self.max_batch_size = max_batch_size
        self.max_wait = max(0.0, max_batch_wait_ms) / 1e3
        self.max_queue_size = max_queue_size
        self.stats = BatcherStats()
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._expected = 0  # photos announced by request_scope, still being decoded
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ callers

    @property
    def queue_depth(self) -> int:
        return self._queued_rows

    @contextlib.contextmanager
    def request_scope(self, deadline: float | None = None,
                      announce: bool = True) -> Iterator[None]:
        """One call's context: its deadline, and notice that a photo is on its way.

        Enter it before decoding: while announced photos are being decoded, a
        forming batch waits for them (up to ``max_batch_wait_ms``); with none
        announced it runs at once. ``announce=False`` for calls without a photo.
        """
        scope = _Scope(deadline, self, pending=announce)
        if announce:
            with self._cond:
                self._expected += 1
        token = _SCOPE.set(scope)
        try:
            yield
        finally:
            _SCOPE.reset(token)
            self._settle(scope)

    def _settle(self, scope: _Scope) -> None:
        with self._cond:
            if scope.pending:
                scope.pending = False
                self._expected -= 1
                self._cond.notify_all()

    def submit_async(self, pixels: np.ndarray, deadline: float | None = None) -> Future:
        """Queue ``pixels`` ([B,3,H,W] or [3,H,W]); the future yields [B, D]."""
        batch = np.asarray(pixels, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[None]
        now = time.monotonic()
        scope = _SCOPE.get()
        announced = scope if scope is not None and scope.batcher is self else None
        rows = len(batch)
        with self._cond:
            if announced is not None and announced.pending:
                # The announced photo is here (or failed): stop waiting for it.
                announced.pending = False
                self._expected -= 1
            self._cond.notify_all()
            if deadline is not None and deadline <= now:
                raise DeadlineExceededError("deadline passed before the photo was queued")
            if self._closed:
                raise BatcherClosedError("the service is shutting down")
            # An oversized request is still served when the queue is empty.
            if self._queued_rows and self._queued_rows + rows > self.max_queue_size:
                self.stats.rejected += 1
                raise QueueFullError(
                    f"{self._queued_rows} photos already wait for the model "
                    f"(max_queue_size {self.max_queue_size}); retry with backoff"
                )
            item = _Item(batch, deadline, now)
            self._queue.append(item)
            self._queued_rows += rows
        return item.future

    def submit(self, pixels: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Blocking submit; ``deadline`` defaults to the one set by ``deadline_scope``."""
        if deadline is None:
            deadline = current_deadline()
        future = self.submit_async(pixels, deadline)
        try:
            out = future.result(
                timeout=None if deadline is None else max(0.0, deadline - time.monotonic())
            )
            scope = _SCOPE.get()
            if scope is not None:
                scope.queue_seconds += getattr(future, "queue_seconds", 0.0)
            return out
        except FutureTimeout:
            if future.cancel():  # still queued: it will never be computed
                raise DeadlineExceededError(
                    "deadline passed while the photo waited for the model"
                ) from None
            return future.result()  # already running: the answer is moments away
        except CancelledError:
            raise DeadlineExceededError("photo was dropped before its batch ran") from None

    __call__ = submit

    def close(self, timeout: float | None = 5.0) -> None:
        """Finish what is queued, then stop the thread; later submits fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------- thread

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._execute(batch)

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            flush_at = self._queue[0].enqueued + self.max_wait
            while (self._queued_rows < self.max_batch_size and self._expected > 0
                   and not self._closed):
                remaining = flush_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._take()

    def _take(self) -> list[_Item]:
        """Pop up to max_batch_size rows; drop cancelled and expired items."""
        batch: list[_Item] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            item = self._queue[0]
            n = len(item.pixels)
            if batch and rows + n > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= n
            if not item.future.set_running_or_notify_cancel():
                self.stats.cancelled += 1
                continue
            if item.deadline is not None and item.deadline <= now:
                self.stats.expired += 1
                item.future.set_exception(
                    DeadlineExceededError("deadline passed while the photo waited for the model")
                )
                continue
            batch.append(item)
            rows += n
        return batch

    def _execute(self, batch: list[_Item]) -> None:
        pixels = (batch[0].pixels if len(batch) == 1
                  else np.concatenate([item.pixels for item in batch]))
        started = time.monotonic()
        try:
            out = np.asarray(self._embed(pixels))
        except BaseException as exc:  # every waiter must hear about it
            self.stats.failed_batches += 1
            for item in batch:
                item.future.set_exception(exc)
            return
        elapsed = time.monotonic() - started
        stats = self.stats
        stats.batches += 1
        stats.rows += len(pixels)
        stats.model_seconds += elapsed
        stats.batch_sizes[len(pixels)] = stats.batch_sizes.get(len(pixels), 0) + 1
        offset = 0
        for item in batch:
            n = len(item.pixels)
            stats.queue_seconds += (started - item.enqueued) * n
            item.future.queue_seconds = started - item.enqueued  # read by submit()
            item.future.set_result(out[offset : offset + n])
            offset += n


# ------------------------------------------------------------ read-ahead


_END = object()


class _ReaderFailure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def read_ahead(items: Iterable[T], fn: Callable[[T], R], window: int) -> Iterator[R]:
    """``map(fn, items)`` with up to ``window`` calls in flight, results in input order.

    A stream's photos are decoded and queued for the model concurrently, so a
    single stream fills model batches. Requests are read on their own thread,
    so a client that waits for each answer before sending the next photo is
    answered as soon as its photo is done (no dead-lock on read-ahead).
    """
    window = max(1, window)
    slots = threading.Semaphore(window)
    pending: queue.Queue = queue.Queue()
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix="stream")

    def reader() -> None:
        try:
            for item in items:
                slots.acquire()
                if stop.is_set():
                    return
                pending.put(pool.submit(fn, item))
        except BaseException as exc:  # the request stream broke: report it in order
            pending.put(_ReaderFailure(exc))
        finally:
            pending.put(_END)

    thread = threading.Thread(target=reader, name="stream-reader", daemon=True)
    thread.start()
    try:
        while True:
            entry = pending.get()
            if entry is _END:
                return
            if isinstance(entry, _ReaderFailure):
                raise entry.exc
            try:
                result = entry.result()
            finally:
                slots.release()
            yield result
    finally:
        stop.set()
        slots.release()  # wake a reader blocked on a full window
        pool.shutdown(wait=False, cancel_futures=True)
