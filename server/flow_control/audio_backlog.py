"""The bound on synthesized audio waiting for the peer's credit (sans-I/O).

A TTS engine produces audio faster than real time; what it made beyond the credit the peer
holds waits in the session until credit comes back (a client's `credit` message, a provider's
mark echo). Above the bound, the session stops pulling audio from the engine between its
pieces, so a slow listener (or a provider that stopped echoing marks) never makes the server
hold a whole reply: at most the credit window plus `SLACK_MS` of audio waits.
"""

from __future__ import annotations

from dataclasses import dataclass

SLACK_MS = 1000  # audio made ahead of the credit, so playback never starves while it refills


@dataclass(frozen=True, slots=True)
class AudioBacklogBound:
    limit: int  # bytes of encoded audio waiting, above which synthesis pauses

    @classmethod
    def for_window(cls, window_bytes: int, bytes_per_ms: float) -> AudioBacklogBound:
        return cls(window_bytes + int(SLACK_MS * bytes_per_ms))

    def full(self, waiting: int) -> bool:
        """Stop pulling audio from the engine."""
        return waiting > self.limit
