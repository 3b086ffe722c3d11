"""Recording one session: a `SessionSocket` and a `SessionHandler` that note every frame in
both directions, then pass it on unchanged. They are put around a session at admission only
when it is recorded; an unrecorded session never meets them.

What is recorded is what crossed the session's ports: inbound frames as the connection
delivered them, outbound ones as the session sent them, the close the session asked for and the
code the connection ended with. Frames the connection answers by itself before a session sees
them (a frame over max_frame_bytes, text that is not UTF-8) show as the close code only.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable

import msgspec

from server.flow_control.recording import RecordingBudget
from server.recording.store import RecordingSink
from server.sessions.upgrade import SessionHandler, SessionSocket
from streamgate_protocol import recording as fmt

log = logging.getLogger("streamgate.recording")


class SessionRecording:
    """The writer of one recording: timing, the byte bound, and a sink that may fail. Nothing
    here raises into the session: a full or failed recording stops recording, never the
    session."""

    __slots__ = ("_budget", "_clock", "_done", "_events", "_sink", "_t0", "header")

    def __init__(self, header: fmt.Header, sink: RecordingSink, budget: RecordingBudget,
                 clock: Callable[[], float]) -> None:
        self.header = header
        self._sink = sink
        self._budget = budget
        self._clock = clock
        self._t0 = clock()
        self._events = 0
        self._done = False  # the trailer is written, or the sink failed
        line = fmt.encode_line(header)
        if not budget.take(len(line)):
            # A query as long as the bound itself (the request line allows ~8 KB): the file
            # must still start with a header, so it goes without the query's values, and the
            # recording stops there (the budget is spent: only the trailer follows).
            self.header = header = msgspec.structs.replace(
                header, query={k: "" for k in list(header.query)[:64]})
            line = fmt.encode_line(header)
            budget.take_trailer(len(line))
        self._put(line)

    @property
    def truncated(self) -> bool:
        return self._budget.full

    def t_ms(self) -> float:
        return round((self._clock() - self._t0) * 1000.0, 3)

    def _put(self, line: bytes) -> None:
        if self._done:
            return
        try:
            self._sink.write(line)
        except OSError:
            log.warning("recording failed; the session goes on unrecorded",
                        extra={"recording": self._sink.name}, exc_info=True)
            self._done = True
            self._close_sink()

    def event(self, line: fmt.Event) -> None:
        if self._done or self._budget.full:
            return
        encoded = fmt.encode_line(line)
        if self._budget.take(len(encoded)):
            self._events += 1
            self._put(encoded)
            return
        # The bound is reached: say so once, from the reserve, and record nothing more.
        marker = fmt.encode_line(fmt.Truncated(t_ms=line.t_ms, max_bytes=self.header.max_bytes))
        self._budget.take_trailer(len(marker))
        self._put(marker)
        log.info("recording reached its size bound; the session goes on unrecorded",
                 extra={"recording": self._sink.name, "max_bytes": self.header.max_bytes})

    def in_text(self, data: bytes) -> None:
        if not self._done and not self._budget.full:
            self.event(fmt.InText(t_ms=self.t_ms(), text=data.decode("utf-8", "replace")))

    def in_binary(self, data: bytes) -> None:
        if not self._done and not self._budget.full:
            self.event(fmt.InBinary(t_ms=self.t_ms(), data=data))

    def out_text(self, data: bytes) -> None:
        if not self._done and not self._budget.full:
            self.event(fmt.OutText(t_ms=self.t_ms(), msg=msgspec.Raw(data)))

    def out_binary(self, data: bytes) -> None:
        if not self._done and not self._budget.full:
            self.event(fmt.OutBinary(t_ms=self.t_ms(), size=len(data), crc32=zlib.crc32(data)))

    def finish(self, code: int) -> None:
        """The connection ended: `closed`, `end`, and the sink is closed (once)."""
        if self._done:
            return
        t_ms = self.t_ms()
        for line in (fmt.Closed(t_ms=t_ms, code=code),
                     fmt.End(t_ms=t_ms, events=self._events + 1, truncated=self._budget.full)):
            encoded = fmt.encode_line(line)
            self._budget.take_trailer(len(encoded))
            self._put(encoded)
        if not self._done:
            self._done = True
            self._close_sink()
            log.info("recording written", extra={
                "recording": self._sink.name, "bytes": self._budget.used,
                "events": self._events, "truncated": self._budget.full})

    def _close_sink(self) -> None:
        try:
            self._sink.close()
        except OSError:
            log.warning("recording could not be closed", extra={"recording": self._sink.name},
                        exc_info=True)


class RecordingSocket:
    """The session's socket, noting what the session sends and how it closes."""

    __slots__ = ("_inner", "_recording")

    def __init__(self, inner: SessionSocket, recording: SessionRecording) -> None:
        self._inner = inner
        self._recording = recording

    @property
    def peer(self) -> str:
        return self._inner.peer

    @property
    def activity(self) -> bool:
        return self._inner.activity

    @activity.setter
    def activity(self, value: bool) -> None:
        self._inner.activity = value

    @property
    def error_frames(self) -> bool:
        return self._inner.error_frames

    @error_frames.setter
    def error_frames(self, value: bool) -> None:
        self._inner.error_frames = value

    @property
    def write_paused(self) -> bool:
        return self._inner.write_paused

    def send_text(self, data: bytes) -> None:
        self._recording.out_text(data)
        self._inner.send_text(data)

    def send_binary(self, data: bytes) -> None:
        self._recording.out_binary(data)
        self._inner.send_binary(data)

    def flush(self) -> None:
        self._inner.flush()

    def close(self, code: int, reason: str = "") -> None:
        recording = self._recording
        recording.event(fmt.CloseSent(t_ms=recording.t_ms(), code=code, reason=reason))
        self._inner.close(code, reason)

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()


class RecordingHandler:
    """The session's handler, noting every frame the connection delivers before the session
    sees it."""

    __slots__ = ("_inner", "_recording")

    def __init__(self, inner: SessionHandler, recording: SessionRecording) -> None:
        self._inner = inner
        self._recording = recording

    def on_text(self, data: bytes) -> None:
        self._recording.in_text(data)
        self._inner.on_text(data)

    def on_binary(self, data: bytes) -> None:
        self._recording.in_binary(data)
        self._inner.on_binary(data)

    def on_read_done(self) -> None:
        self._inner.on_read_done()

    def on_writable(self) -> None:
        self._inner.on_writable()

    def on_idle(self) -> None:
        self._inner.on_idle()

    def on_drain(self) -> None:
        recording = self._recording
        recording.event(fmt.Drain(t_ms=recording.t_ms()))
        self._inner.on_drain()

    def on_connection_closed(self, code: int) -> None:
        try:
            self._inner.on_connection_closed(code)
        finally:
            self._recording.finish(code)


def record(start: Callable[[SessionSocket], SessionHandler], socket: SessionSocket,
           recording: SessionRecording) -> SessionHandler:
    """Start the session on a recording socket and hand the connection a recording handler."""
    handler = start(RecordingSocket(socket, recording))
    return RecordingHandler(handler, recording)
