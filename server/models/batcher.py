"""Micro-batching of requests from many sessions into one engine call.

Sessions call `submit()`; one worker task gathers what is queued into a batch (up to max_batch,
or whatever arrived within max_wait_ms of the batch's first request) and runs it. The queue is
bounded by max_pending: when it is full, submit waits, so a slow engine slows its callers down
instead of growing a queue.

Hot path note: this runs once per audio frame per session, so it avoids a task per request and
uses bare futures and a call_later timer instead of wait_for().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Generic, TypeVar

from server.models.base import EngineError, EngineUnavailable

Req = TypeVar("Req")
Resp = TypeVar("Resp")

log = logging.getLogger(__name__)


class CallStats:
    """What the batcher did with one task's requests: their time queued before their batch
    ran (summed; the caller resets it) and the size of the last one's batch. A task that wants
    them sets BATCH_STATS once (the ASR runner's invoke task: the `queue_ms` of its metrics and
    its engine spans); submit() adds to it when its request is answered."""

    __slots__ = ("batch_size", "queue_s")

    def __init__(self) -> None:
        self.queue_s = 0.0
        self.batch_size = 0


BATCH_STATS: ContextVar[CallStats | None] = ContextVar("streamgate_batch_stats", default=None)


class _Item(Generic[Req, Resp]):
    # A class (not a tuple) so deque.remove() compares by identity, never by the request's
    # own __eq__ (which may be costly or, for arrays, ambiguous).
    __slots__ = ("batch_size", "enqueued_at", "fut", "req", "taken_at")

    def __init__(self, req: Req, fut: asyncio.Future[Resp], enqueued_at: float) -> None:
        self.req = req
        self.fut = fut
        self.enqueued_at = enqueued_at
        self.taken_at = enqueued_at  # when its batch started running
        self.batch_size = 0


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class MicroBatcher(Generic[Req, Resp]):
    def __init__(
        self,
        run_batch: Callable[[list[Req]], Awaitable[list[Resp]]],
        *,
        max_batch: int,
        max_wait_ms: float,
        max_pending: int,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_pending = max_pending
        self._on_batch = on_batch
        self._name = name
        self._pending: deque[_Item[Req, Resp]] = deque()
        self._inflight: list[_Item[Req, Resp]] = []
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._wake_threshold = 1
        self._worker: asyncio.Task[None] | None = None
        # The loop, held from start(): asyncio.get_running_loop() per submit is a getpid()
        # system call on Python 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Requests queued and not yet taken into a batch."""
        return len(self._pending)

    @property
    def waiting_for_room(self) -> int:
        return sum(1 for w in self._room_waiters if not w.done())

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._closed

    async def start(self) -> None:
        if self._closed:
            raise EngineUnavailable(f"{self._name}: closed")
        if self._worker is None:
            self._loop = loop = asyncio.get_running_loop()
            self._worker = loop.create_task(
                self._work(), name=f"{self._name}-worker"
            )
            self._worker.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._closed:
            return
        # Only a bug gets here; fail loudly rather than leave submitters waiting forever.
        log.error("%s: worker died", self._name, exc_info=task.exception())
        self._closed = True
        self._worker = None
        self._fail_all(EngineUnavailable(f"{self._name}: worker died"))

    async def submit(self, req: Req) -> Resp:
        loop = self._loop
        if self._closed or self._worker is None or loop is None:
            raise EngineUnavailable(f"{self._name}: not running")
        # Loop rather than a single wait: a woken waiter can lose the slot to a new submit
        # that arrived in between; it then simply waits again.
        while len(self._pending) >= self.max_pending:
            room = loop.create_future()
            self._room_waiters.append(room)
            try:
                await room
            except asyncio.CancelledError:
                if room.cancelled():
                    with contextlib.suppress(ValueError):
                        self._room_waiters.remove(room)
                else:
                    # We were handed a slot and cancelled before using it: pass it on.
                    self._release_room(1)
                raise
            if self._closed:
                raise EngineUnavailable(f"{self._name}: closed")
        fut: asyncio.Future[Resp] = loop.create_future()
        item = _Item(req, fut, loop.time())
        self._pending.append(item)
        # Wake the worker only when it has something to do: when idle (threshold 1) or when
        # a batch it is filling became full. Waking it per submit would cost a timer per frame.
        if self._wakeup is not None and len(self._pending) >= self._wake_threshold:
            _wake(self._wakeup)
        try:
            result = await fut
        except asyncio.CancelledError:
            # Awaiting the future directly means it is cancelled with us; the worker skips
            # done futures, so the batch it may be part of is unaffected. If it was still
            # queued, drop it so it neither runs nor holds a pending slot.
            try:
                self._pending.remove(item)
            except ValueError:
                pass
            else:
                self._release_room(1)
            raise
        stats = BATCH_STATS.get()
        if stats is not None:
            stats.queue_s += item.taken_at - item.enqueued_at
            stats.batch_size = item.batch_size
        return result

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._fail_all(EngineUnavailable(f"{self._name}: closed"))

    def _fail_all(self, err: EngineError) -> None:
        for item in [*self._inflight, *self._pending]:
            if not item.fut.done():
                item.fut.set_exception(err)
        self._inflight.clear()
        self._pending.clear()
        while self._room_waiters:
            _wake(self._room_waiters.popleft())

    def _release_room(self, n: int) -> None:
        while n > 0 and self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                n -= 1

    async def _wait(self, delay: float | None) -> None:
        loop = self._loop
        assert loop is not None  # the worker runs from start()
        self._wakeup = wake = loop.create_future()
        handle = loop.call_later(delay, _wake, wake) if delay is not None else None
        try:
            await wake
        finally:
            self._wakeup = None
            if handle is not None:
                handle.cancel()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake_threshold = 1
            while not self._pending:
                await self._wait(None)
            deadline = self._pending[0].enqueued_at + self.max_wait_s
            self._wake_threshold = self.max_batch
            while len(self._pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await self._wait(remaining)
            batch = self._inflight
            while self._pending and len(batch) < self.max_batch:
                item = self._pending.popleft()
                if not item.fut.done():
                    batch.append(item)
            self._release_room(self.max_pending - len(self._pending))
            if batch:
                await self._run(batch)
            batch.clear()

    async def _run(self, batch: list[_Item[Req, Resp]]) -> None:
        loop = self._loop
        assert loop is not None
        taken_at, size = loop.time(), len(batch)
        for item in batch:
            item.taken_at = taken_at
            item.batch_size = size
        started = time.perf_counter()
        try:
            try:
                results = await self._run_batch([item.req for item in batch])
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # aclose(): it fails the in-flight items itself
                # run_batch leaked a cancellation that was not aimed at us; letting it end the
                # worker would strand every later submit, so it is just a failed batch.
                raise EngineError(f"{self._name}: batch cancelled") from None
            if len(results) != len(batch):
                raise EngineError(
                    f"{self._name}: run_batch returned {len(results)} results for "
                    f"{len(batch)} requests",
                    retryable=False,
                )
        except Exception as exc:
            for item in batch:
                if not item.fut.done():
                    item.fut.set_exception(exc)
        else:
            for item, result in zip(batch, results, strict=True):
                if not item.fut.done():
                    item.fut.set_result(result)
        if self._on_batch is not None:
            try:
                self._on_batch(len(batch), time.perf_counter() - started)
            except Exception:
                # Metrics must never take the engine down with them.
                log.exception("%s: on_batch callback failed", self._name)
