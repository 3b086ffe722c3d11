"""The ports of recording: where a recording goes. The local directory store
(server/recording/local.py) is the one shipped; another (object storage, a queue) replaces it by
satisfying these two protocols."""

from __future__ import annotations

from typing import Protocol

from streamgate_protocol.recording import Header


class RecordingSink(Protocol):
    """One recording being written. Called on the event loop for every event: it must not
    block for long (buffer, write in large pieces)."""

    @property
    def name(self) -> str:
        """Where the recording is, for the log line that says it was made."""
        ...

    def write(self, line: bytes) -> None:
        """Append one encoded line; raises OSError when it cannot (the recording then stops,
        never its session)."""
        ...

    def close(self) -> None:
        """Everything written is kept; called once, at the end of the session."""
        ...


class RecordingStore(Protocol):
    def open(self, header: Header) -> RecordingSink:
        """A new recording for the session `header` describes (raises OSError when none can be
        made: the session then runs unrecorded)."""
        ...

    def sweep(self, now: float) -> int:
        """Delete recordings past the retention period (`now`: wall-clock seconds since the
        epoch); how many were deleted. Runs in a worker thread."""
        ...
