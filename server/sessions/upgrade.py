"""The contract between a listener and the endpoints behind it: the upgrade an endpoint is
asked to admit, what it answers (`Admitted` or a `Rejected` from the error catalogue), and what
the session it starts is given and must handle.

The session side owns these ports; the WebSocket listener (server/ws) implements them, and an
HTTP request or a test can too. So a runner or a call never imports the socket code, and
the socket code never learns what a session does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from server.sessions.wire import Wire


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    path: str
    query: dict[str, str]
    api_key: str | None
    headers: Mapping[str, str] = field(default_factory=dict)


class SessionSocket(Wire, Protocol):
    """The accepted socket as its session sees it: a `Wire`, plus what a session may tell the
    connection about itself."""

    # Who is on the other end (logs).
    @property
    def peer(self) -> str: ...

    # Set by a session that knows its peer is alive without a pong (it takes our audio while
    # its pongs wait unread behind what it sent): no keepalive close.
    activity: bool
    # False: the connection sends no JSON `error` frame before a non-1000 close (a provider's
    # socket that takes only the provider's messages).
    error_frames: bool


class SessionHandler(Protocol):
    """What a connection drives once the upgrade is accepted."""

    def on_text(self, data: bytes) -> None: ...

    def on_binary(self, data: bytes) -> None: ...

    def on_read_done(self) -> None:
        """All frames of one socket read were delivered: a good moment to process them."""
        ...

    def on_writable(self) -> None: ...

    def on_idle(self) -> None: ...

    def on_drain(self) -> None: ...

    def on_connection_closed(self, code: int) -> None: ...


@dataclass(slots=True)
class Admitted:
    """The upgrade is accepted: `start` builds the session once 101 is on the wire; `cancel`
    releases what admission reserved if it never starts (the client left meanwhile)."""

    start: Callable[[SessionSocket], SessionHandler]
    cancel: Callable[[], None] = lambda: None
