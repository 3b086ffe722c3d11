"""A wake-up flag a task sleeps on: asyncio.Event, minus a system call per wait.

asyncio's Event asks asyncio for the running loop at every wait (`_get_loop`, from
asyncio.mixins), and on Python 3.11 that is a getpid() system call (the check that the loop
was not inherited across a fork). The ingest and invoke stages wait on their events once per
engine chunk or per read, for every session: this one asks once, at its first wait, and keeps
the loop. Everything else is asyncio's Event: the same semantics, the same type.
"""

from __future__ import annotations

import asyncio


class Wakeup(asyncio.Event):
    """An asyncio.Event bound to the loop of its first wait (it must stay on that loop)."""

    def __init__(self) -> None:
        super().__init__()
        self._bound_loop: asyncio.AbstractEventLoop | None = None

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        # Overrides asyncio.mixins._LoopBoundMixin._get_loop, which Event.wait calls.
        loop = self._bound_loop
        if loop is None:
            loop = self._bound_loop = asyncio.get_running_loop()
        return loop
