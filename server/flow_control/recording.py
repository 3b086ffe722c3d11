"""Bounds on session recordings (record=true; docs/recording.md): a recording is written while
its session runs, so its size is bounded per recording, and a full recording stops recording,
never the session."""

from __future__ import annotations

from typing import Final

# recording.max_bytes: one recording's file at most this large (header, events, trailer). At
# 16 kHz PCM16 a recording takes about 46 KB per second of audio (base64 in JSON lines), so this
# default holds about 24 minutes of a session's audio.
DEFAULT_MAX_RECORDING_BYTES: Final = 64 * 1024 * 1024
# The smallest recording.max_bytes accepted: the header and the trailer must fit.
MIN_RECORDING_BYTES: Final = 4096
# Kept back from the budget for the last lines (the `truncated` marker, `closed`, `end`), so a
# full recording still ends well-formed.
TRAILER_RESERVE_BYTES: Final = 512
# recording.retention_days: recordings older than this are deleted (at start-up and then every
# RETENTION_SWEEP_INTERVAL_S).
DEFAULT_RETENTION_DAYS: Final = 30.0
RETENTION_SWEEP_INTERVAL_S: Final = 3600.0


class RecordingBudget:
    """Bytes one recording may still write. `take` answers whether a line fits; once one does
    not, the budget is spent for good (a recording with a hole in the middle would replay as
    a different session) and only the trailer, from the reserve, is written."""

    __slots__ = ("full", "limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = max(limit - TRAILER_RESERVE_BYTES, 0)
        self.used = 0
        self.full = False

    def take(self, size: int) -> bool:
        if self.full or self.used + size > self.limit:
            self.full = True
            return False
        self.used += size
        return True

    def take_trailer(self, size: int) -> None:
        """The trailer's lines: counted, never refused (the reserve holds them)."""
        self.used += size
