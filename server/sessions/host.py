"""The supervisor port of a session: what a runner, a call or an HTTP speech request needs of
the process that hosts it, nothing more.

`WsServer` (server/ws/server.py) satisfies it structurally: it tracks every task so drain can
await it and none leaks, and it owns the live-session count its admission reads (the
`max_connections` bound). Tests pass a fake. Sessions never import the listener itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol


class SessionHost(Protocol):
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a task the host tracks (awaited at drain, never leaked)."""
        ...

    def session_opened(self) -> None:
        """A session started: it counts against the node's session limit until closed."""
        ...

    def session_closed(self) -> None:
        """The session `session_opened` counted has ended (once per opened session)."""
        ...
