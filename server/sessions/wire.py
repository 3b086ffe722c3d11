"""The ports of a session runner: the wire it moves bytes through (what it needs of a
connection, nothing more) and the clock its deadlines run on.

`WsConnection` satisfies it structurally (a WebSocket), `HttpWire` in server/http/speech.py does
for a request streamed through a session, and tests use a fake. A runner never needs to know
which: it sends what its machine produced, closes when told, and pauses or resumes reading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Wire(Protocol):
    @property
    def write_paused(self) -> bool:
        """The peer is not taking what was sent (the write buffer is above its high mark);
        `on_writable` is called on the session when it is below the low mark again."""
        ...

    def send_text(self, data: bytes) -> None:
        """One text message (UTF-8 JSON already encoded); may be buffered until `flush`."""
        ...

    def send_binary(self, data: bytes) -> None: ...

    def flush(self) -> None:
        """Write what `send_*` buffered (one write for a batch of messages)."""
        ...

    def close(self, code: int, reason: str = "") -> None:
        """Close with this code once everything sent before is written."""
        ...

    def pause_reading(self) -> None:
        """Stop delivering input (back pressure on the peer) until `resume_reading`."""
        ...

    def resume_reading(self) -> None: ...


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Time for a runner: the event loop satisfies it (`loop.time`, `loop.call_at`); tests pass
    a fake one they advance by hand, so deadlines are tested without sleeping."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object], /) -> Timer: ...
