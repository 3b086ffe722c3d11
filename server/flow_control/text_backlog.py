"""The bound on a TTS session's text waiting for synthesis (sans-I/O).

Text waits in the chunker (no sentence end yet) and as chunks queued for the engine, which
speaks it no faster than the client takes the audio. A client that sends text faster than that
(or stops reading audio) would otherwise make the server hold all of it.

Two levels: at `capacity` the session stops reading its socket (TCP back pressure blocks the
client's sends) until the backlog is down to half; text beyond `limit` is refused. The gap
between them is what a socket read already in hand can still deliver after reading paused: one
read returns at most `READ_SLACK_CHARS` bytes (asyncio 256 KiB, uvloop 250 kB), and a text
message has no more characters than bytes. So a client that reading can pause is never refused;
only one that keeps sending while the server must read (to get its `credit`) can reach `limit`.
"""

from __future__ import annotations

from dataclasses import dataclass

READ_SLACK_CHARS = 256 * 1024


@dataclass(frozen=True, slots=True)
class TextBacklogBound:
    capacity: int  # characters waiting at which reading pauses (tts.session.max_pending_chars)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("max_pending_chars must be >= 1")

    @property
    def limit(self) -> int:
        """The most text ever waiting; a message that would go past it is refused."""
        return self.capacity + READ_SLACK_CHARS

    def admits(self, pending: int, incoming: int) -> bool:
        return pending + incoming <= self.limit

    def full(self, pending: int) -> bool:
        """Stop reading the socket."""
        return pending >= self.capacity

    def resumable(self, pending: int) -> bool:
        """Low-water mark: read again at half capacity, not at the first character spoken, so
        reading does not toggle once per chunk."""
        return pending <= self.capacity // 2
