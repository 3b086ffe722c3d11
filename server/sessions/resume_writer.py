"""A resumable session's writes of its resume point (server/sessions/resume.py): one save in
flight at a time and the newest point wins, so a session that ends utterances faster than the
store answers never queues writes; a save refused because a resume took the session over is
reported as `superseded`.

A background save starts a loop turn after it is asked for (`request`), behind what that turn
already queued: the work that asked for it (a chunk's first audio on its way out, the
synthesis a `flush` started) and the same work of the sessions handled in the same turn goes
first; the save (~70 us of CPU in the Redis client) is not on their critical path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from server.sessions.resume import AnyResumePoint, ResumeStore

SaveOutcome = Literal["saved", "superseded", "failed"]


class ResumeWriter:
    __slots__ = ("_extra", "_log", "_pending", "_scheduled", "_store", "_task", "_ttl_s", "epoch",
                 "on_saved", "superseded", "token")

    def __init__(self, store: ResumeStore, token: str, *, epoch: int, ttl_s: float,
                 log: logging.Logger, log_extra: Mapping[str, Any]) -> None:
        self._store = store
        self.token = token
        self.epoch = epoch  # the points written carry it: a resume raises it
        self._ttl_s = ttl_s
        self._log = log
        self._extra = log_extra
        # What the next background save writes, built only when it is written: a session whose
        # state changes per text token asks often, and only the newest point is ever written.
        self._pending: Callable[[], AnyResumePoint] | None = None
        self._task: asyncio.Task[None] | None = None
        self._scheduled: asyncio.Handle | None = None  # the turn that starts the next write
        self.superseded = False
        # Called with each point and how its save went (background saves only).
        self.on_saved: Callable[[AnyResumePoint, SaveOutcome], None] | None = None

    async def save(self, point: AnyResumePoint) -> SaveOutcome:
        if self.superseded:
            return "superseded"
        try:
            saved = await self._store.save(self.token, point, self._ttl_s)
        except Exception as exc:  # the store is down: the session goes on, less resumable
            self._log.warning("resume point not saved: %s", exc, extra=dict(self._extra))
            return "failed"
        if not saved:
            self.superseded = True
            return "superseded"
        return "saved"

    def request(self, make_point: Callable[[], AnyResumePoint]) -> None:
        """Save, in the background, the point `make_point` builds when its turn comes
        (replacing one not yet written)."""
        self._pending = make_point
        if self._task is None and self._scheduled is None:
            self._scheduled = asyncio.get_running_loop().call_soon(self._begin)

    def _begin(self) -> None:
        self._scheduled = None
        if self._task is None and self._pending is not None:
            self._task = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        try:
            while self._pending is not None:
                make_point, self._pending = self._pending, None
                point = make_point()
                outcome = await self.save(point)
                if self.on_saved is not None:
                    self.on_saved(point, outcome)
        finally:
            self._task = None

    async def forget(self) -> None:
        """The session ended for good: a resume is refused from now on. A save cancelled here
        may still reach the store after the forget (a batched store sends what was queued);
        the store refuses it (`ResumeStore.forget` leaves a newer epoch behind)."""
        await self.aclose()
        if self.superseded:
            return
        try:
            await self._store.forget(self.token, self.epoch, self._ttl_s)
        except Exception as exc:
            self._log.warning("resume point not forgotten: %s", exc, extra=dict(self._extra))

    async def aclose(self) -> None:
        task, self._task = self._task, None
        self._pending = None
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
