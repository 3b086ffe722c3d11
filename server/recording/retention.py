"""Retention: recordings past `recording.retention_days` are deleted at start-up and then every
RETENTION_SWEEP_INTERVAL_S, by a task the gateway starts and cancels. The sweep walks the
directory in a worker thread: the event loop never waits on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from server.flow_control.recording import RETENTION_SWEEP_INTERVAL_S
from server.recording.store import RecordingStore

log = logging.getLogger("streamgate.recording")


class RetentionSweeper:
    def __init__(self, store: RecordingStore, *,
                 interval_s: float = RETENTION_SWEEP_INTERVAL_S,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.interval_s = interval_s
        self.wall_clock = wall_clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def sweep_once(self) -> int:
        try:
            return await asyncio.to_thread(self.store.sweep, self.wall_clock())
        except OSError:
            log.warning("recording retention sweep failed", exc_info=True)
            return 0

    async def _run(self) -> None:
        while True:
            await self.sweep_once()
            await asyncio.sleep(self.interval_s)
