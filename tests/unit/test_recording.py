"""Session recording (server/recording) and the replay's comparison (streamgate_client.replay),
with a fake socket, handler, sink and clock: what is recorded, in what order and with what
times; the byte bound; a failing store; who is recorded; retention; the file format."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from server.flow_control.recording import TRAILER_RESERVE_BYTES, RecordingBudget
from server.protocol.admission import Principal
from server.protocol.errors import Rejected
from server.recording.endpoint import BadRecordParam, Recorder, RecordingEndpoint
from server.recording.local import LocalRecordingStore, tenant_folder
from server.recording.retention import RetentionSweeper
from server.recording.session import RecordingHandler, RecordingSocket, SessionRecording
from server.sessions.upgrade import Admitted, SessionHandler, SessionSocket, UpgradeRequest
from streamgate_client.replay import (
    Audio,
    Received,
    canonical_lines,
    compare,
    received_from_recording,
    session_url,
)
from streamgate_protocol import recording as fmt
from tests.unit.test_layering import edges_into

PRINCIPAL = Principal(tenant_id="acme", key_id="k1")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeSink:
    def __init__(self, fail_after: int | None = None) -> None:
        self.lines: list[bytes] = []
        self.closed = 0
        self.fail_after = fail_after
        self.name = "fake"

    def write(self, line: bytes) -> None:
        if self.fail_after is not None and len(self.lines) >= self.fail_after:
            raise OSError(28, "No space left on device")
        self.lines.append(line)

    def close(self) -> None:
        self.closed += 1

    def recording(self) -> fmt.Recording:
        return fmt.decode_lines(self.lines)


class FakeStore:
    def __init__(self, sink: FakeSink | None = None, fail: bool = False) -> None:
        self.sink = sink or FakeSink()
        self.fail = fail
        self.opened: list[fmt.Header] = []

    def open(self, header: fmt.Header) -> FakeSink:
        if self.fail:
            raise PermissionError(13, "Permission denied")
        self.opened.append(header)
        return self.sink

    def sweep(self, now: float) -> int:
        return 0


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.closed: tuple[int, str] | None = None
        self.peer = "127.0.0.1:1"
        self.activity = False
        self.error_frames = True
        self.write_paused = False
        self.flushes = 0
        self.paused = False

    def send_text(self, data: bytes) -> None:
        self.sent.append(("text", data))

    def send_binary(self, data: bytes) -> None:
        self.sent.append(("binary", data))

    def flush(self) -> None:
        self.flushes += 1

    def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class EchoSession:
    """A session that answers each text with a JSON message and each binary with a binary."""

    def __init__(self, socket: SessionSocket) -> None:
        self.socket = socket
        self.calls: list[str] = []
        socket.send_text(b'{"type":"ready","session_id":"s1"}')

    def on_text(self, data: bytes) -> None:
        self.calls.append("text")
        self.socket.send_text(b'{"type":"echo","text":' + json.dumps(data.decode()).encode()
                              + b"}")

    def on_binary(self, data: bytes) -> None:
        self.calls.append("binary")
        self.socket.send_binary(data[::-1])

    def on_read_done(self) -> None:
        self.calls.append("read_done")

    def on_writable(self) -> None:
        self.calls.append("writable")

    def on_idle(self) -> None:
        self.calls.append("idle")
        self.socket.close(4008, "idle")

    def on_drain(self) -> None:
        self.calls.append("drain")

    def on_connection_closed(self, code: int) -> None:
        self.calls.append(f"closed {code}")


def header(max_bytes: int = 1 << 20) -> fmt.Header:
    return fmt.Header(recording_id="r1", kind="asr", path="/v1/asr/stream",
                      query={"model": "synthetic"}, tenant_id="acme",
                      started_at="2026-12-05T00:00:00.000+00:00", max_bytes=max_bytes)


def recorded_session(sink: FakeSink, clock: FakeClock, max_bytes: int = 1 << 20) -> tuple[
        FakeSocket, EchoSession, RecordingHandler, SessionRecording]:
    recording = SessionRecording(header(max_bytes), sink, RecordingBudget(max_bytes), clock)
    socket = FakeSocket()
    session = EchoSession(RecordingSocket(socket, recording))
    return socket, session, RecordingHandler(session, recording), recording


def test_every_frame_both_ways_is_recorded_in_order_with_times() -> None:
    sink, clock = FakeSink(), FakeClock()
    socket, session, handler, _ = recorded_session(sink, clock)
    clock.now += 0.020
    handler.on_binary(b"\x01\x02\x03")
    handler.on_read_done()
    clock.now += 0.5
    handler.on_text(b'{"type":"close"}')
    handler.on_drain()
    clock.now += 0.1
    handler.on_idle()  # the session closes 4008
    handler.on_connection_closed(4008)
    # the session saw everything, unchanged, and its socket got everything it sent
    assert session.calls == ["binary", "read_done", "text", "drain", "idle", "closed 4008"]
    assert socket.sent[1] == ("binary", b"\x03\x02\x01")
    assert socket.closed == (4008, "idle")
    recording = sink.recording()
    assert recording.complete and sink.closed == 1
    events = recording.events
    assert [type(e) for e in events] == [
        fmt.OutText, fmt.InBinary, fmt.OutBinary, fmt.InText, fmt.OutText, fmt.Drain,
        fmt.CloseSent, fmt.Closed, fmt.End]
    assert [e.t_ms for e in events] == [0.0, 20.0, 20.0, 520.0, 520.0, 520.0, 620.0, 620.0,
                                        620.0]
    binary_in = events[1]
    assert isinstance(binary_in, fmt.InBinary) and binary_in.data == b"\x01\x02\x03"
    binary_out = events[2]
    assert isinstance(binary_out, fmt.OutBinary) and binary_out.size == 3
    text_in = events[3]
    assert isinstance(text_in, fmt.InText) and text_in.text == '{"type":"close"}'
    ready = events[0]
    assert isinstance(ready, fmt.OutText)
    assert json.loads(bytes(ready.msg)) == {"type": "ready", "session_id": "s1"}
    end = events[-1]
    assert isinstance(end, fmt.End) and end.events == 8 and not end.truncated


def test_the_socket_passes_its_state_through() -> None:
    sink, clock = FakeSink(), FakeClock()
    recording = SessionRecording(header(), sink, RecordingBudget(1 << 20), clock)
    inner = FakeSocket()
    socket = RecordingSocket(inner, recording)
    socket.activity = True
    socket.error_frames = False
    socket.pause_reading()
    socket.flush()
    inner.write_paused = True
    assert inner.activity and not inner.error_frames and inner.paused and inner.flushes == 1
    assert socket.write_paused and socket.peer == inner.peer
    socket.resume_reading()
    assert not inner.paused


def test_a_full_recording_stops_recording_and_ends_well_formed_within_its_bound() -> None:
    max_bytes = 4096
    sink, clock = FakeSink(), FakeClock()
    _, session, handler, recording = recorded_session(sink, clock, max_bytes)
    for _ in range(100):
        clock.now += 0.02
        handler.on_binary(bytes(160))
    handler.on_text(b'{"type":"close"}')
    handler.on_connection_closed(1000)
    assert session.calls.count("binary") == 100  # the session never noticed
    assert recording.truncated
    written = b"".join(sink.lines)
    assert len(written) <= max_bytes
    events = sink.recording().events
    assert [type(e) for e in events[-3:]] == [fmt.Truncated, fmt.Closed, fmt.End]
    end = events[-1]
    assert isinstance(end, fmt.End) and end.truncated
    # nothing was recorded after the marker but the trailer
    assert not any(isinstance(e, fmt.InText) for e in events)


def test_the_header_counts_against_the_bound_even_with_a_huge_query() -> None:
    """Review of issue 17: the header line (the client's whole query) was written outside the
    budget, so a long query took a recording past `max_bytes`."""
    max_bytes = 4096
    sink, clock = FakeSink(), FakeClock()
    huge = fmt.Header(recording_id="r1", kind="asr", path="/v1/asr/stream",
                      query={"model": "synthetic", "x": "a" * 6000}, tenant_id="acme",
                      started_at="2026-12-05T00:00:00.000+00:00", max_bytes=max_bytes)
    recording = SessionRecording(huge, sink, RecordingBudget(max_bytes), clock)
    handler = RecordingHandler(EchoSession(RecordingSocket(FakeSocket(), recording)), recording)
    for _ in range(20):
        clock.now += 0.02
        handler.on_binary(bytes(160))
    handler.on_connection_closed(1000)
    assert len(b"".join(sink.lines)) <= max_bytes
    got = sink.recording()
    assert got.header.query == {"model": "", "x": ""}  # the names only: the values did not fit
    assert recording.truncated and isinstance(got.events[-1], fmt.End)
    # A header that fits is counted too: header + events + trailer within the bound.
    sink = FakeSink()
    _, _, handler, _ = recorded_session(sink, clock, max_bytes)
    for _ in range(100):
        handler.on_binary(bytes(160))
    handler.on_connection_closed(1000)
    assert len(b"".join(sink.lines)) <= max_bytes


def test_the_budget_keeps_its_reserve_and_stays_spent() -> None:
    budget = RecordingBudget(TRAILER_RESERVE_BYTES + 100)
    assert budget.take(60)
    assert not budget.take(60)
    assert not budget.take(1)  # spent for good: no hole in the middle of a recording
    budget.take_trailer(300)
    assert budget.used == 360 and budget.full


def test_a_failing_store_never_fails_the_session() -> None:
    sink, clock = FakeSink(fail_after=3), FakeClock()
    _, session, handler, _ = recorded_session(sink, clock)
    for _ in range(5):
        handler.on_binary(b"\x00\x00")
    handler.on_connection_closed(1000)
    assert session.calls == ["binary"] * 5 + ["closed 1000"]
    assert len(sink.lines) == 3 and sink.closed == 1


def upgrade(**query: str) -> UpgradeRequest:
    return UpgradeRequest(path="/v1/asr/stream", query=dict(query), api_key="secret")


def test_who_is_recorded() -> None:
    recorder = Recorder(FakeStore(), max_bytes=1 << 20, tenants=["acme"])
    assert recorder.wanted({}, "acme")  # the tenant's setting
    assert not recorder.wanted({"record": "false"}, "acme")  # the session opts out
    assert not recorder.wanted({}, "other")
    assert recorder.wanted({"record": "true"}, "other")
    assert recorder.wanted({"record": "1"}, "other")
    assert not recorder.wanted({"record": "true", "resume_token": "t"}, "other")
    with pytest.raises(BadRecordParam):
        recorder.wanted({"record": "maybe"}, "other")


class FakeEndpoint:
    kind = "asr"

    def __init__(self) -> None:
        self.admitted = 0
        self.sessions: list[EchoSession] = []

    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        self.admitted += 1

        def start(socket: SessionSocket) -> SessionHandler:
            session = EchoSession(socket)
            self.sessions.append(session)
            return session

        return Admitted(start=start)


def test_an_unrecorded_session_meets_no_wrapper() -> None:
    inner = FakeEndpoint()
    endpoint = RecordingEndpoint(inner, Recorder(FakeStore(), max_bytes=1 << 20))
    decision = asyncio.run(endpoint.admit(upgrade(), PRINCIPAL))
    assert isinstance(decision, Admitted)
    socket = FakeSocket()
    handler = decision.start(socket)
    assert handler is inner.sessions[0]  # the session itself, not a recording handler
    assert inner.sessions[0].socket is socket


def test_a_recorded_session_is_wrapped_and_its_header_has_no_secret() -> None:
    inner, store = FakeEndpoint(), FakeStore()
    endpoint = RecordingEndpoint(inner, Recorder(store, max_bytes=1 << 20))
    decision = asyncio.run(endpoint.admit(
        upgrade(record="true", model="synthetic", api_key="secret"), PRINCIPAL))
    assert isinstance(decision, Admitted)
    handler = decision.start(FakeSocket())
    assert isinstance(handler, RecordingHandler)
    handler.on_connection_closed(1000)
    (opened,) = store.opened
    assert opened.query == {"record": "true", "model": "synthetic"}
    assert (opened.kind, opened.tenant_id, opened.path) == ("asr", "acme", "/v1/asr/stream")
    assert store.sink.recording().complete


def test_record_true_is_refused_before_admission_when_recording_is_off() -> None:
    inner = FakeEndpoint()
    endpoint = RecordingEndpoint(inner, Recorder(None, max_bytes=1 << 20))
    refused = asyncio.run(endpoint.admit(upgrade(record="true"), PRINCIPAL))
    assert isinstance(refused, Rejected) and refused.status == 400
    bad = asyncio.run(endpoint.admit(upgrade(record="perhaps"), PRINCIPAL))
    assert isinstance(bad, Rejected) and bad.code == "bad_request"
    assert inner.admitted == 0  # nothing reserved, no lease taken
    assert isinstance(asyncio.run(endpoint.admit(upgrade(), PRINCIPAL)), Admitted)


def test_a_store_that_cannot_open_leaves_the_session_unrecorded() -> None:
    inner = FakeEndpoint()
    endpoint = RecordingEndpoint(inner, Recorder(FakeStore(fail=True), max_bytes=1 << 20))
    decision = asyncio.run(endpoint.admit(upgrade(record="true"), PRINCIPAL))
    assert isinstance(decision, Admitted)
    assert decision.start(FakeSocket()) is inner.sessions[0]


def test_local_store_files_and_retention(tmp_path: Path) -> None:
    store = LocalRecordingStore(tmp_path, retention_days=2)
    sink = store.open(header())
    sink.write(b"{}\n")
    sink.close()
    path = tmp_path / "acme" / "r1.jsonl"
    assert path.read_bytes() == b"{}\n"
    assert path.stat().st_mode & 0o777 == 0o600  # personal data: the server's user only
    assert (tmp_path / "acme").stat().st_mode & 0o777 == 0o700
    with pytest.raises(FileExistsError):
        store.open(header())  # never overwritten
    old = tmp_path / "acme" / "old.jsonl"
    old.write_bytes(b"{}\n")
    now = path.stat().st_mtime
    os.utime(old, (now - 3 * 86400, now - 3 * 86400))
    assert store.sweep(now) == 1
    assert path.exists() and not old.exists()
    assert store.sweep(now + 3 * 86400) == 1 and not path.exists()


def test_tenant_folders_are_safe_names() -> None:
    assert tenant_folder("acme-1") == "acme-1"
    for bad in ("../etc", "..", "a/b", "", "x" * 65):
        folder = tenant_folder(bad)
        assert folder.startswith("t-") and "/" not in folder


def test_a_recording_cut_short_reads_up_to_its_last_whole_line() -> None:
    lines = [fmt.encode_line(header()),
             fmt.encode_line(fmt.InText(t_ms=1.0, text="{}")),
             b'{"type":"in_bin']
    recording = fmt.decode_lines(lines)
    assert len(recording.events) == 1 and not recording.complete
    with pytest.raises(fmt.RecordingFormatError):
        fmt.decode_lines([*lines[:1], b"garbage\n", *lines[1:2]])
    with pytest.raises(fmt.RecordingFormatError, match="not a streamgate recording"):
        fmt.decode_lines([b'{"type":"transcript"}\n'])


def transcript(utterance: int, text: str, final: bool = True) -> dict[str, object]:
    return {"type": "transcript", "utterance_id": utterance, "is_final": final, "text": text}


def test_the_comparison_leaves_out_timing_and_ids_and_groups_utterances() -> None:
    recorded = Received(frames=[
        {"type": "ready", "session_id": "a", "resume_token": "x", "credit_bytes": 10},
        {"type": "speech_started", "at_ms": 0},
        transcript(1, "hel", final=False),
        {"type": "credit", "bytes": 5},
        {"type": "speech_started", "at_ms": 900},  # before utterance 1's final came
        transcript(1, "hello"),
        {"type": "utterance_end", "utterance_id": 1},
        transcript(2, "world"),
        {"type": "usage", "audio_ms": 1000},
        {"type": "summary", "utterances": 2},
    ], close_code=1000)
    replayed = Received(frames=[
        {"type": "ready", "session_id": "b", "resume_token": "y", "credit_bytes": 10},
        {"type": "speech_started", "at_ms": 0},
        transcript(1, "hello"),
        {"type": "utterance_end", "utterance_id": 1},
        {"type": "speech_started", "at_ms": 900},
        transcript(2, "world"),
        {"type": "summary", "utterances": 2},
    ], close_code=1000)
    assert canonical_lines(recorded, kind="asr") == canonical_lines(replayed, kind="asr")
    assert canonical_lines(recorded, kind="asr", interims=True) != canonical_lines(
        replayed, kind="asr", interims=True)
    replayed.close_code = 1011
    assert canonical_lines(recorded, kind="asr") != canonical_lines(replayed, kind="asr")


def test_audio_is_compared_by_the_bytes_of_each_run() -> None:
    one = Received(frames=[Audio(100), Audio(50), {"type": "audio_done", "chunk_id": 1},
                           Audio(10)], close_code=1000)
    other = Received(frames=[Audio(150), {"type": "audio_done", "chunk_id": 1}, Audio(4),
                             Audio(6)], close_code=1000)
    assert canonical_lines(one, kind="tts") == canonical_lines(other, kind="tts") == [
        "session: audio 150 bytes", 'session: {"chunk_id":1,"type":"audio_done"}',
        "session: audio 10 bytes", "close 1000"]


def test_compare_reads_the_recording_side_from_the_file_events() -> None:
    sink, clock = FakeSink(), FakeClock()
    _, _, handler, _ = recorded_session(sink, clock)
    handler.on_text(b"hi")
    handler.on_connection_closed(1000)
    recording = sink.recording()
    assert received_from_recording(recording).frames == [
        {"type": "ready", "session_id": "s1"}, {"type": "echo", "text": "hi"}]
    same = Received(frames=[{"type": "ready", "session_id": "zz"},
                            {"type": "echo", "text": "hi"}], close_code=1000)
    assert compare(recording, same).same
    different = Received(frames=same.frames[:1], close_code=1000)
    result = compare(recording, different)
    assert not result.same
    assert '-session: {"text":"hi","type":"echo"}' in result.diff()
    assert compare(recording, different, ignore=["text"]).diff() != []


def test_the_replay_url_keeps_the_recorded_route_and_query() -> None:
    head = fmt.Header(recording_id="r", kind="asr", path="/v1/asr/stream",
                      query={"model": "synthetic", "record": "true", "endpointing_ms": "500"},
                      tenant_id="t", started_at="", max_bytes=4096)
    assert session_url("ws://h:1", head, {}) == (
        "ws://h:1/v1/asr/stream?model=synthetic&endpointing_ms=500")
    assert session_url("ws://h:1/v1/listen?x=1", head, {"endpointing_ms": "900"}) == (
        "ws://h:1/v1/listen?model=synthetic&endpointing_ms=900&x=1")


@pytest.mark.parametrize("forbidden", ["server.ws", "server.billing"])
def test_recording_knows_no_sockets_or_billing(forbidden: str) -> None:
    assert edges_into("server.recording", forbidden) == {}


class CountingStore(FakeStore):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.sweeps: list[float] = []
        self.sweep_fails = fail

    def sweep(self, now: float) -> int:
        self.sweeps.append(now)
        if self.sweep_fails:
            raise PermissionError(13, "Permission denied")
        return 2


def test_the_retention_sweeper_sweeps_at_start_and_stops_clean() -> None:
    async def run() -> tuple[list[float], int, int]:
        store = CountingStore()
        sweeper = RetentionSweeper(store, interval_s=3600, wall_clock=lambda: 42.0)
        sweeper.start()
        for _ in range(50):  # the first sweep runs at once, in a worker thread
            if store.sweeps:
                break
            await asyncio.sleep(0.01)
        await sweeper.stop()
        failing = RetentionSweeper(CountingStore(fail=True), wall_clock=lambda: 1.0)
        return store.sweeps, await sweeper.sweep_once(), await failing.sweep_once()

    sweeps, swept, failed = asyncio.run(run())
    assert sweeps[0] == 42.0 and swept == 2
    assert failed == 0  # a sweep that fails is logged, and the server goes on
