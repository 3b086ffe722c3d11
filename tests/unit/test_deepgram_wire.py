"""The Deepgram dialect's wire (server/compat/deepgram/wire.py) on a fake socket: Deepgram's
closes, audio counted, and reading paused while the session asks or while what we wrote waits
unread, resumed only when neither holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.compat.deepgram.wire import DeepgramWire


@dataclass
class FakeSocket:
    write_paused: bool = False
    activity: bool = False
    error_frames: bool = True
    peer: str = "127.0.0.1:1"
    reading: list[str] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)
    closed: tuple[int, str] | None = None

    def send_text(self, data: bytes) -> None:
        self.sent.append(data)

    def send_binary(self, data: bytes) -> None:
        self.sent.append(data)

    def flush(self) -> None:
        pass

    def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)

    def pause_reading(self) -> None:
        self.reading.append("pause")

    def resume_reading(self) -> None:
        self.reading.append("resume")


def test_closes_are_deepgrams_where_it_has_them() -> None:
    for ours, theirs in [((4400, "bad_audio"), (1008, "DATA-0000")),
                         ((4008, "idle_timeout"), (1011, "NET-0001")),
                         ((4029, "rate_limited"), (4029, "rate_limited"))]:
        sock = FakeSocket()
        DeepgramWire(sock).close(*ours)
        assert sock.closed == theirs


def test_audio_sent_is_counted() -> None:
    sock = FakeSocket()
    counted: list[int] = []
    wire = DeepgramWire(sock, on_audio_sent=counted.append)
    wire.send_binary(b"\0" * 320)
    wire.send_text(b"{}")
    assert counted == [320] and len(sock.sent) == 2


def test_reading_resumes_only_when_neither_the_session_nor_the_client_holds_it() -> None:
    sock = FakeSocket()
    wire = DeepgramWire(sock)
    wire.hold_while_not_written()  # writes not backed up: no hold
    assert not wire.held and sock.reading == []
    sock.write_paused = True
    wire.hold_while_not_written()
    wire.hold_while_not_written()  # once
    assert wire.held and sock.reading == ["pause"]
    wire.pause_reading()  # the session's own bound, too: already paused
    wire.resume_reading()  # the session lets go, but the client still does not read
    assert sock.reading == ["pause"]
    sock.write_paused = False
    wire.written()
    assert not wire.held and sock.reading == ["pause", "resume"]
    wire.pause_reading()
    sock.write_paused = True
    wire.hold_while_not_written()
    wire.written()  # drained, but the session still holds it
    assert sock.reading == ["pause", "resume", "pause"]
    wire.resume_reading()
    assert sock.reading == ["pause", "resume", "pause", "resume"]
