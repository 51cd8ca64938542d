"""Micro-batching: requests that arrive together are answered by one call of a batch function.

One worker thread takes the oldest waiting request, waits at most ``max_wait_ms`` after it
arrived for others, and runs ``fn`` once on up to ``max_batch`` rows, in arrival order (a request
may carry several rows; one bigger than ``max_batch`` runs alone). ``fn`` returns one result per
request; if it raises, only the requests of that batch fail. ``max_batch=1`` serves requests one
at a time, with no waiting.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable


class BatcherClosed(RuntimeError):
    """The batcher no longer takes requests (the server is shutting down)."""


@dataclass
class _Request:
    item: Any
    rows: int
    future: Future
    arrived: float


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    rows: int = 0
    failed_batches: int = 0
    recent_sizes: deque = field(default_factory=lambda: deque(maxlen=1000))  # requests per batch

    def as_dict(self) -> dict[str, Any]:
        recent = list(self.recent_sizes)
        return {"batches": self.batches, "batched_requests": self.requests, "batched_rows": self.rows,
                "failed_batches": self.failed_batches,
                "mean_batch_size": self.requests / self.batches if self.batches else 0.0,
                "mean_batch_rows": self.rows / self.batches if self.batches else 0.0,
                "recent_mean_batch_size": sum(recent) / len(recent) if recent else 0.0,
                "max_batch_size_seen": max(recent, default=0)}


class MicroBatcher:
    def __init__(self, fn: Callable[[list], list], *, max_batch: int = 32, max_wait_ms: float = 5.0,
                 name: str = "slimcart-batcher"):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}.")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._pending: deque[_Request] = deque()
        self._pending_rows = 0
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any, rows: int = 1) -> Future:
        """Queue ``item`` (``rows`` rows of the batch); its future gets ``fn``'s result for it."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise BatcherClosed("The server is shutting down and takes no new requests.")
            self._pending.append(_Request(item, rows, fut, time.monotonic()))
            self._pending_rows += rows
            self._cv.notify()
        return fut

    @property
    def queued(self) -> int:
        return len(self._pending)

    def close(self, timeout: float | None = None) -> None:
        """Take no more requests, answer the queued ones, then stop the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def _next_batch(self) -> list[_Request] | None:
        with self._cv:
            while not self._pending:
                if self._closed:
                    return None
                self._cv.wait()
            deadline = self._pending[0].arrived + self.max_wait
            while self._pending_rows < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch = [self._pending.popleft()]
            rows = batch[0].rows
            while self._pending and rows + self._pending[0].rows <= self.max_batch:
                batch.append(self._pending.popleft())
                rows += batch[-1].rows
            self._pending_rows -= rows
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]  # drop cancelled
            if not batch:
                continue
            try:
                results = self.fn([r.item for r in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for "
                                       f"{len(batch)} requests")
            except Exception as exc:  # noqa: BLE001 - the requests of this batch get the error
                self.stats.failed_batches += 1
                for r in batch:
                    r.future.set_exception(exc)
                continue
            s = self.stats
            s.batches, s.requests, s.rows = s.batches + 1, s.requests + len(batch), s.rows + sum(r.rows for r in batch)
            s.recent_sizes.append(len(batch))
            for r, res in zip(batch, results):
                r.future.set_result(res)
