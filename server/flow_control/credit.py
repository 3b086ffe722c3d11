"""Audio credit granted to a client, in bytes of its own encoding (sans-I/O)."""

from __future__ import annotations


class CreditWindow:
    """The client may have `window` unacknowledged bytes in flight.

    Consumed bytes are handed back as credit once at least a quarter of the window has drained,
    so a well-behaved client gets one `credit` message per quarter window, not one per frame.
    """

    __slots__ = ("_pending", "granted_total", "received_total", "threshold", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.threshold = max(1, window // 4)
        self.granted_total = window
        self.received_total = 0
        self._pending = 0

    def received(self, n: int) -> bool:
        """Count bytes that arrived; True if the client exceeded what it was granted."""
        self.received_total += n
        return self.received_total > self.granted_total

    def consumed(self, n: int) -> int:
        """Bytes left the ingest queue; return the credit to grant now (0 if not yet worth it)."""
        self._pending += n
        if self._pending < self.threshold:
            return 0
        grant, self._pending = self._pending, 0
        self.granted_total += grant
        return grant

    def resize(self, window: int) -> None:
        """Before any audio: the session's format changed (config message), so the window did."""
        self.granted_total += window - self.window
        self.window = window
        self.threshold = max(1, window // 4)

    @property
    def outstanding(self) -> int:
        """Credit the client holds right now (negative if it sent more than granted)."""
        return self.granted_total - self.received_total
