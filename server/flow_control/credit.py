"""Credit for bytes flowing one way over a connection, in bytes of their encoding (sans-I/O).

One type for both directions, counted the same way: the receiver grants, the sender uses, and
`outstanding` is what the sender may still send.

* Receiving (ASR: the client streams audio to us): `received` counts what arrived, `consumed`
  hands drained bytes back as grants to send to the client, `resize` follows a format change.
* Sending (TTS: the client's `credit` messages; telephony: the provider's mark echoes): `grant`
  adds what the peer granted, `covers` says whether a frame may go now, `spend` counts it sent,
  `refill` returns the whole window when the peer's buffer was emptied (a barge-in `clear`).
"""

from __future__ import annotations


class CreditWindow:
    """The sender may have `window` unacknowledged bytes in flight.

    Receiving side: consumed bytes are handed back as credit once at least a quarter of the
    window has drained, so a well-behaved client gets one `credit` message per quarter window,
    not one per frame.
    """

    __slots__ = ("_pending", "granted_total", "received_total", "threshold", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.threshold = max(1, window // 4)
        self.granted_total = window
        # Bytes that crossed: received by us, or (sending side) sent by us.
        self.received_total = 0
        self._pending = 0

    # --- receiving side -------------------------------------------------------------------------

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

    # --- sending side ---------------------------------------------------------------------------

    def grant(self, n: int) -> None:
        """The peer granted `n` more bytes (n > 0: a zero or negative grant is the caller's to
        refuse, as a protocol error)."""
        if n <= 0:
            raise ValueError("a credit grant must be positive")
        self.granted_total += n

    def covers(self, n: int) -> bool:
        """`n` bytes may be sent now."""
        return n <= self.granted_total - self.received_total

    def spend(self, n: int) -> None:
        """`n` bytes were sent (the caller checked `covers`)."""
        self.received_total += n

    def refill(self) -> None:
        """The peer holds none of our bytes any more: the whole window is ours again."""
        self.granted_total = self.received_total + self.window

    @property
    def outstanding(self) -> int:
        """Credit the sender holds right now (negative if it sent more than granted)."""
        return self.granted_total - self.received_total
