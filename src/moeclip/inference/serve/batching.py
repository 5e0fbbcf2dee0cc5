"""Dynamic batching for ``moeclip serve``: a bounded queue and one worker thread that owns the model.

Requests wait in one queue; the worker takes the oldest one and up to ``max_batch_size - 1``
more with the same key (object description and domain: one text encoding and one
post-processing rule per forward), waiting at most ``max_batch_delay_ms`` after the oldest
arrived for the batch to fill. Requests of other keys stay queued in order and form their own
batches. The queue is bounded: :meth:`Batcher.submit` refuses at once (:class:`QueueFull`, a 503
for the client) rather than letting requests pile up until clients time out. A request whose
deadline passed or whose caller gave up (a cancelled future) is dropped before its batch runs,
so a client that went away costs nothing and never breaks the batch of the others.

Per-request results equal unbatched ones up to float32 rounding: each image of a batch is
preprocessed, encoded and post-processed on its own; only the matrix products are shared.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Deque, Hashable, List, Optional

from ...errors import MoECLIPError

__all__ = ["BatchOptions", "Batcher", "QueueFull", "DeadlineExceeded"]


@dataclass(frozen=True)
class BatchOptions:
    """The serving limits of ``moeclip serve`` (one flag each); checked once, here."""

    max_batch_size: int = 8
    max_batch_delay_ms: float = 10.0
    max_queue: int = 64
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise MoECLIPError("--max-batch-size must be at least 1")
        if self.max_queue < 1:
            raise MoECLIPError("--max-queue must be at least 1")
        for flag, value in (("--max-batch-delay-ms", self.max_batch_delay_ms),
                            ("--drain-timeout-s", self.drain_timeout_s)):
            if not value >= 0:
                raise MoECLIPError(f"{flag} must not be negative")
        if not self.request_timeout_s > 0:
            raise MoECLIPError("--request-timeout-s must be positive")


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests: answer 503 now."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its batch ran: answer 504."""


@dataclass
class _Item:
    key: Hashable
    payload: Any
    future: Future
    arrived: float
    deadline: Optional[float]


class Batcher:
    """``run_batch(key, payloads) -> results`` (same order) called by one worker thread on batches.

    :meth:`submit` returns a :class:`concurrent.futures.Future` of ``(result, batch size)``.
    """

    def __init__(self, run_batch: Callable[[Hashable, List[Any]], List[Any]], max_batch_size: int = 8,
                 max_batch_delay_ms: float = 10.0, max_queue: int = 64):
        self.run_batch = run_batch
        self.max_batch_size = int(max_batch_size)
        self.delay = float(max_batch_delay_ms) / 1000.0
        self.max_queue = int(max_queue)
        self._pending: Deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def from_options(cls, run_batch, options: BatchOptions) -> "Batcher":
        return cls(run_batch, options.max_batch_size, options.max_batch_delay_ms, options.max_queue)

    # ------------------------------------------------------------------ callers
    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return len(self._pending)

    def full(self) -> bool:
        return len(self._pending) >= self.max_queue

    def submit(self, key: Hashable, payload: Any, deadline: Optional[float] = None) -> Future:
        """Queue one request (``deadline``: a ``time.monotonic()`` value); QueueFull when full or closing."""
        if self._thread is None:
            self.start()  # an app used without its lifespan (a TestClient outside 'with')
        future: Future = Future()
        with self._cond:
            if self._closing:
                raise QueueFull("the service is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._pending.append(_Item(key, payload, future, time.monotonic(), deadline))
            self._cond.notify_all()
        return future

    async def submit_async(self, key: Hashable, payload: Any, deadline: Optional[float] = None):
        """:meth:`submit` awaited: ``(result, batch size)``; cancelling it drops the request if still queued."""
        return await asyncio.wrap_future(self.submit(key, payload, deadline))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Batcher":
        """Start the worker (again, after :meth:`close`: an app's lifespan may run more than once)."""
        with self._cond:
            self._closing = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="moeclip-batcher", daemon=True)
                self._thread.start()
        return self

    def close(self, timeout: Optional[float] = None) -> bool:
        """Refuse new requests, run those queued (no more waiting for batches to fill), stop.

        Returns whether everything queued was answered within ``timeout`` seconds.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is None:
            return not self._pending
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ worker
    def _same_key(self, key) -> int:
        return sum(1 for item in self._pending if item.key == key)

    def _take(self) -> Optional[List[_Item]]:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if not self._pending:
                return None  # closing and nothing left
            first = self._pending[0]
            fill_by = first.arrived + self.delay
            while not self._closing and self._same_key(first.key) < self.max_batch_size:
                left = fill_by - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, rest = [], deque()
            while self._pending:
                item = self._pending.popleft()
                (batch if item.key == first.key and len(batch) < self.max_batch_size else rest).append(item)
            self._pending = rest
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: List[_Item]) -> None:
        now = time.monotonic()
        live = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue  # the caller gave up
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
                continue
            live.append(item)
        if not live:
            return
        try:
            results = self.run_batch(live[0].key, [item.payload for item in live])
        except BaseException as exc:  # every caller gets the error; the worker keeps serving
            for item in live:
                item.future.set_exception(exc)
            return
        for item, result in zip(live, results):
            item.future.set_result((result, len(live)))
