"""The fast path must be invisible: whatever bytes a client sends, split however the network
splits them, a connection that parses binary and text frames itself delivers the same messages,
writes the same bytes and ends in the same state as one where websockets parses everything
(UTF-8 included: a text frame that is not UTF-8 fails the connection with 1007 either way).

No event loop: admission is a coroutine that never suspends here, driven by hand.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.utils import apply_mask

from loadtest.hotpath import MemoryTransport, upgrade_bytes
from server.config import load_config
from server.sessions.upgrade import Admitted
from server.telemetry.metrics import Metrics
from server.ws.connection import WsConnection

MAX_SIZE = 2048


class Recorder:
    """A session that writes down what its connection delivered, in order."""

    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log

    def on_text(self, data: bytes) -> None:
        self.log.append(("text", data))

    def on_binary(self, data: bytes) -> None:
        self.log.append(("binary", data))

    def on_read_done(self) -> None:
        pass

    def on_writable(self) -> None:
        pass

    def on_idle(self) -> None:
        pass

    def on_drain(self) -> None:
        pass

    def on_connection_closed(self, code: int) -> None:
        self.log.append(("closed", code))


class Router:
    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log

    async def admit(self, request: Request, conn: WsConnection) -> Admitted:
        return Admitted(start=lambda _conn: Recorder(self.log))


class LoopFreeServer:
    """What a WsConnection asks of its server, with admission run to completion at once."""

    def __init__(self, router: Any = None) -> None:
        self.config = load_config(overrides={"server": {"max_frame_bytes": MAX_SIZE}}).server
        self.now = 0.0
        self.log: list[tuple[str, Any]] = []
        self.router = Router(self.log) if router is None else router
        self.metrics = Metrics()  # invalid handshakes are counted by the connection itself

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            coro.send(None)
        except StopIteration:
            return
        raise AssertionError("admission suspended")

    def connection_opened(self, conn: WsConnection) -> None:
        pass

    def connection_closed(self, conn: WsConnection) -> None:
        pass


def open_connection(fast: bool) -> tuple[WsConnection, MemoryTransport, LoopFreeServer]:
    server = LoopFreeServer()
    transport = MemoryTransport(keep=True)
    conn = WsConnection(server)  # type: ignore[arg-type]
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(upgrade_bytes("/rec"))
    assert conn.session is not None and conn._fast
    conn._fast = fast
    return conn, transport, server


def raw_frame(first: int, payload: bytes, mask: bool = True) -> bytes:
    """Any frame, valid or not: websockets' serializer refuses to build the invalid ones."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + apply_mask(payload, key)


def masked(opcode: int, payload: bytes, fin: bool = True, rsv1: bool = False) -> bytes:
    return raw_frame((0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode, payload)


def unmasked(opcode: int, payload: bytes) -> bytes:
    return raw_frame(0x80 | opcode, payload, mask=False)


def test_raw_frames_are_what_websockets_would_send() -> None:
    frame = Frame(Opcode.BINARY, b"x" * 300)
    theirs = frame.serialize(mask=False, extensions=[])
    assert raw_frame(0x82, bytes(frame.data), mask=False) == theirs


def run_both(stream: bytes, cuts: list[int], server_close_at: int | None = None) -> None:
    """Feed the same bytes, cut at the same places, to both connections and compare: after
    every read (a fast path that fails the connection late, once EOF hands websockets what it
    held, ends in the same state), and at the end."""
    outcomes = []
    steps: list[list[tuple[int, bytes, int | None, bool]]] = []
    for fast in (True, False):
        conn, transport, server = open_connection(fast)
        bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
        trace: list[tuple[int, bytes, int | None, bool]] = []
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            if transport.closed:
                break
            if server_close_at is not None and i == server_close_at:
                conn.close(4000, "server closes")
            conn.data_received(stream[a:b])
            out = bytes(transport.out or b"")
            trace.append((len(server.log), out[out.index(b"\r\n\r\n") + 4:], conn.close_code,
                          transport.closed))
        steps.append(trace)
        if not transport.closed:
            conn.eof_received()
        conn.connection_lost(None)
        sent = bytes(transport.out or b"")
        sent = sent[sent.index(b"\r\n\r\n") + 4:]  # after the 101 (its Date may differ)
        outcomes.append((server.log, sent, conn.close_code,
                         conn.protocol.state, transport.closed))
    fast_outcome, ws_outcome = outcomes
    assert steps[0] == steps[1]
    assert fast_outcome == ws_outcome


def _state_after(fast: bool, reads: list[bytes]) -> tuple[Any, ...]:
    conn, transport, server = open_connection(fast)
    for data in reads:
        conn.data_received(data)
    return conn.close_code, transport.closed, conn.protocol.state, list(server.log)


def test_a_continuation_over_what_is_left_of_max_size_fails_at_its_header() -> None:
    """Review of issue 15: inside a fragmented message websockets allows a frame only what is
    left of max_size and fails the connection (1009) at the header; the fast path held it,
    waiting for up to max_size more bytes."""
    first = masked(0x2, b"a" * 1000, fin=False)
    head = masked(0x0, b"b" * MAX_SIZE)[:8]  # 2 + 2 (16-bit length) + 4 (mask)
    fast, slow = _state_after(True, [first + head]), _state_after(False, [first + head])
    assert fast == slow and fast[0] == 1009 and fast[1]
    run_both(first + masked(0x0, b"b" * MAX_SIZE), [len(first) + 8])


def test_empty_continuations_keep_nothing() -> None:
    """Empty fragments add nothing to a message: they are not kept (a list entry each, for as
    long as the message stays open, was a client's way to grow a session's memory)."""
    for fast in (True, False):
        conn, transport, server = open_connection(fast)
        conn.data_received(masked(0x2, b"a", fin=False))
        for _ in range(20):
            conn.data_received(masked(0x0, b"", fin=False) * 500)
        assert len(conn._frag_parts) == 1 and not transport.closed
        conn.data_received(masked(0x0, b"b"))
        assert server.log[-1] == ("binary", b"ab")


def test_an_upgrade_read_ending_in_crlfcrlf_inside_a_frame_leaves_it_to_websockets() -> None:
    """A frame sent with the upgrade whose mask key is CRLFCRLF: the read ends with a blank
    line, but not the request's. The fast path must not start mid-frame."""
    payload = bytes((0x82, 0x80, 0, 0, 0, 0))
    frame = bytes((0x82, 0x80 | len(payload))) + b"\r\n\r\n" + payload
    logs = []
    for fast in (True, False):
        server = LoopFreeServer()
        conn = WsConnection(server)  # type: ignore[arg-type]
        conn.connection_made(MemoryTransport(keep=True))  # type: ignore[arg-type]
        conn.data_received(upgrade_bytes("/rec") + frame[:6])
        if not fast:
            conn._fast = False
        else:
            assert not conn._fast
        conn.data_received(frame[6:] + masked(0x2, b"next"))
        logs.append(list(server.log))
    sent = apply_mask(payload, b"\r\n\r\n")  # what the client masked
    assert logs[0] == logs[1] == [("binary", sent), ("binary", b"next")]


def _payload(n: int) -> bytes:
    return os.urandom(n)


good_frame = st.one_of(
    st.integers(0, 300).map(lambda n: masked(0x2, _payload(n))),
    st.sampled_from([0, 125, 126, 127, 1000, MAX_SIZE]).map(lambda n: masked(0x2, _payload(n))),
    st.text(max_size=40).map(lambda t: masked(0x1, t.encode())),
    # Telephony's media messages: JSON of ~330 bytes (a 16-bit length), ASCII or not.
    st.text(min_size=100, max_size=700).map(lambda t: masked(0x1, t.encode())),
    st.sampled_from([125, 126, 127, 330, MAX_SIZE]).map(lambda n: masked(0x1, b"j" * n)),
    st.binary(max_size=20).map(lambda b: masked(0x9, b)),
    st.binary(max_size=20).map(lambda b: masked(0xA, b)),
    st.lists(st.binary(max_size=50), min_size=2, max_size=4).map(
        lambda parts: b"".join(
            masked(0x2 if i == 0 else 0x0, p, fin=i == len(parts) - 1)
            for i, p in enumerate(parts)
        )
    ),
)
bad_frame = st.sampled_from([
    masked(0x8, b"\x03\xe8bye"),                       # client close
    masked(0x8, b""),                                  # close without a code
    masked(0x2, b"x" * (MAX_SIZE + 1)),                # over max_size: 1009
    masked(0x2, b"x" * 70000),                         # 64-bit length, over max_size
    unmasked(0x2, b"abc"),                             # clients must mask: 1002
    masked(0x2, b"abc", rsv1=True),                    # RSV bit without an extension
    masked(0x0, b"abc"),                               # continuation with nothing to continue
    masked(0x2, b"a", fin=False) + masked(0x2, b"b"),  # new message inside a fragmented one
    masked(0x1, b"\xff\xfe"),                          # text that is not UTF-8: 1007
    masked(0x1, b'{"event":"media","x":"' + b"a" * 300 + b'\xc3"}'),  # ... 16-bit length
    masked(0x1, b"ok \xed\xa0\x80"),                    # ... a UTF-16 surrogate
    masked(0x1, b"x" * (MAX_SIZE + 1)),                # text over max_size: 1009
    masked(0x1, b"ok \xe2\x82", fin=False) + masked(0x0, b"!"),  # ... split in fragments
    masked(0x8, b"\x03\xe8\xff"),                      # close reason that is not UTF-8
    masked(0x9, b"p" * 126),                           # control frame too long
    b"\x83\x80\x00\x00\x00\x00",                       # reserved opcode
])


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(good_frame, max_size=12),
    ending=st.one_of(st.none(), bad_frame),
    after=st.lists(good_frame, max_size=3),
    cuts=st.lists(st.integers(0, 6000), max_size=8),
    server_close_at=st.one_of(st.none(), st.integers(0, 8)),
)
def test_fast_path_matches_websockets(
    frames: list[bytes], ending: bytes | None, after: list[bytes], cuts: list[int],
    server_close_at: int | None,
) -> None:
    stream = b"".join(frames) + (ending or b"") + b"".join(after)
    run_both(stream, cuts, server_close_at)


def test_every_split_of_a_frame_delivers_it_once() -> None:
    frame = masked(0x2, bytes(range(200)))
    stream = frame + masked(0x2, b"tail")
    for cut in range(1, len(frame) + 4):
        run_both(stream, [cut])
        conn, _, server = open_connection(True)
        conn.data_received(stream[:cut])
        conn.data_received(stream[cut:])
        assert server.log == [("binary", bytes(range(200))), ("binary", b"tail")]


def test_frames_sent_with_the_upgrade_are_left_to_websockets() -> None:
    """A client that does not wait for the 101: websockets may hold part of a frame, so the
    fast path must not start on what could be the middle of one."""
    server = LoopFreeServer()
    transport = MemoryTransport(keep=True)
    conn = WsConnection(server)  # type: ignore[arg-type]
    conn.connection_made(transport)  # type: ignore[arg-type]
    frame = masked(0x2, b"early audio")
    conn.data_received(upgrade_bytes("/rec") + frame[:5])
    assert conn.session is not None and not conn._fast
    conn.data_received(frame[5:] + masked(0x2, b"more"))
    assert server.log == [("binary", b"early audio"), ("binary", b"more")]


@pytest.mark.parametrize("head", [b"\x83\x80", b"\x82\x7e", b"\x81\x7e\x01"])
def test_a_partial_header_websockets_refuses_is_not_held(head: bytes) -> None:
    """A reserved opcode or an unmasked frame fails on its first two bytes in websockets: the
    fast path must not hold them until more bytes (or our own close) come."""
    ping = masked(0x9, b"p")
    run_both(ping + head + b"\x00" * 8, [len(ping) + len(head)], server_close_at=1)
    run_both(ping + head + b"\x00" * 8, [len(ping) + len(head)])
    conn, transport, _ = open_connection(True)
    conn.data_received(ping + head)
    assert not conn._pending and transport.closed and conn.close_code == 1002
    conn.close(4000, "server closes")  # nothing left to close: no error


def test_a_partial_frame_held_at_close_goes_to_websockets() -> None:
    conn, transport, server = open_connection(True)
    frame = masked(0x2, b"z" * 300)
    conn.data_received(frame[:100])
    assert conn._pending
    conn.close(4008, "idle")
    assert not conn._fast and not conn._pending
    conn.data_received(frame[100:] + masked(0x8, b"\x0f\xa8"))
    assert server.log == [("binary", b"z" * 300)]
    assert transport.closed and conn.close_code == 4008


def test_one_frame_per_read_at_every_length_encoding() -> None:
    """The single-frame shortcut (a read that is exactly one small frame) must not read a
    16-bit or 64-bit length field as a 7-bit one: 126 + 6 == 132 bytes could be either."""
    for n in (0, 1, 124, 125, 126, 127, 128, 1000):
        frame = masked(0x2, bytes(i % 251 for i in range(n)))
        run_both(frame + frame, [len(frame)])
        conn, _, server = open_connection(True)
        conn.data_received(frame)
        conn.data_received(frame)
        expected = [("binary", bytes(i % 251 for i in range(n)))] * 2
        assert server.log == expected  # empty too: the session answers it with empty_frame


@pytest.mark.parametrize("n", [0, 1, 124, 125, 126, 127, 128, 330, 1000, MAX_SIZE])
@pytest.mark.parametrize("alphabet", ["ascii", "utf8", "invalid"])
def test_one_text_frame_per_read_at_every_length_encoding(
    n: int, alphabet: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A telephony provider's read: one JSON text frame, mostly of a 16-bit length; UTF-8
    text never reaches websockets' parser."""
    payload = bytes(0x20 + i % 90 for i in range(n))
    if alphabet == "utf8" and n >= 3:
        payload = payload[:-3] + "\u20ac".encode()
    elif alphabet == "invalid" and n >= 1:
        payload = payload[:-1] + b"\xc3"
    frame = masked(0x1, payload)
    run_both(frame + frame, [len(frame)])
    conn, transport, server = open_connection(True)
    valid = alphabet != "invalid" or n == 0
    if valid:
        def parsed_by_websockets(*args: object) -> None:
            raise AssertionError("a UTF-8 text frame left the fast path")

        monkeypatch.setattr(WsConnection, "_receive_ws", parsed_by_websockets)
    conn.data_received(frame)
    conn.data_received(frame)
    if not valid:
        assert server.log == []
        assert transport.closed and conn.close_code == 1007
    else:
        assert server.log == [("text", payload)] * 2


# --- UTF-8 (RFC 6455 8.1): fail with 1007, our `error` frame first -------------------------------


def server_frames(sent: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked frame the server wrote after its 101."""
    data = sent[sent.index(b"\r\n\r\n") + 4:]
    frames = []
    while data:
        length, head = data[1] & 0x7F, 2
        if length >= 126:
            extra = 2 if length == 126 else 8
            length, head = int.from_bytes(data[2:2 + extra], "big"), 2 + extra
        frames.append((data[0] & 0x0F, data[head:head + length]))
        data = data[head + length:]
    return frames


def assert_failed_1007(conn: WsConnection, transport: MemoryTransport, error: bool) -> None:
    frames = server_frames(bytes(transport.out or b""))
    close = frames[-1]
    assert close[0] == 0x8 and int.from_bytes(close[1][:2], "big") == 1007
    if error:
        assert len(frames) == 2 and frames[0][0] == 0x1
        body = json.loads(frames[0][1])
        assert body["type"] == "error" and body["code"] == "invalid_utf8", body
        assert "not valid UTF-8" in body["message"]
    else:
        assert len(frames) == 1
    assert transport.closed and conn.close_code == 1007


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("error_frames", [True, False])
@pytest.mark.parametrize(
    "frames",
    [
        # invalid UTF-8 in a field no decoder reads: still a text frame that is not UTF-8
        [masked(0x1, b'{"type":"keepalive","x":"\xff\xfe"}')],
        # split across fragments: only the whole message can be judged
        [masked(0x1, b'{"type":"keepalive","x":"\xe2\x82', fin=False),
         masked(0x0, b'"}')],
        [masked(0x1, b"\xed\xa0\x80")],  # a UTF-16 surrogate, which UTF-8 forbids
    ],
)
def test_text_that_is_not_utf8_fails_the_connection_1007(
    fast: bool, error_frames: bool, frames: list[bytes]
) -> None:
    conn, transport, server = open_connection(fast)
    conn.error_frames = error_frames  # False: a telephony provider's socket
    after = masked(0x1, b'{"type":"keepalive"}') + masked(0x2, b"audio")
    conn.data_received(masked(0x2, b"before") + b"".join(frames) + after)
    conn.connection_lost(None)
    # Nothing from the bad frame on reaches the session.
    assert server.log == [("binary", b"before"), ("closed", 1007)]
    assert_failed_1007(conn, transport, error_frames)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("error_frames", [True, False])
def test_close_reason_that_is_not_utf8_gets_an_error_before_1007(
    fast: bool, error_frames: bool
) -> None:
    conn, transport, server = open_connection(fast)
    conn.error_frames = error_frames
    conn.data_received(masked(0x8, b"\x03\xe8bye \xff"))
    conn.connection_lost(None)
    assert server.log == [("closed", 1007)]
    assert_failed_1007(conn, transport, error_frames)


def test_utf8_text_is_delivered_even_when_split_inside_a_character() -> None:
    for fast in (True, False):
        conn, transport, server = open_connection(fast)
        text = '{"type":"text","text":"caf\u00e9 \u20ac \U0001f600"}'.encode()
        cut = text.index(b"\xe2") + 1
        conn.data_received(masked(0x1, text[:cut], fin=False) + masked(0x0, text[cut:]))
        conn.data_received(masked(0x1, text))
        assert server.log == [("text", text), ("text", text)]
        assert not transport.closed and conn.close_code is None


def test_a_text_frame_while_closing_ends_the_connection_without_data_after_our_close() -> None:
    conn, transport, _ = open_connection(True)
    conn.close(4008, "idle")
    conn.data_received(masked(0x1, b"\xff"))
    frames = server_frames(bytes(transport.out or b""))
    assert [op for op, _ in frames] == [0x8]  # no `error` after our own close frame
    assert transport.closed and conn.close_code == 4008


# --- websockets' own refusals, in our JSON error shape -------------------------------------------


def refusal(request: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    server = LoopFreeServer()
    transport = MemoryTransport(keep=True)
    conn = WsConnection(server)  # type: ignore[arg-type]
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(request)
    sent = bytes(transport.out or b"")
    head, _, body = sent.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert transport.closed and conn.session is None
    return int(status_line.split()[1]), headers, json.loads(body)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (upgrade_bytes("/rec?" + "a" * 9000), 414),  # request line over websockets' 8 KiB
        (upgrade_bytes("/rec").replace(b"\r\n\r\n", b"\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n"),
         431),
        (upgrade_bytes("/rec").replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"),
         400),
        (upgrade_bytes("/rec").replace(b"Upgrade: websocket\r\n", b""), 426),
        (upgrade_bytes("/rec").replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""),
         400),
    ],
)
def test_websockets_refusals_are_json(request_bytes: bytes, status: int) -> None:
    got, headers, body = refusal(request_bytes)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert body["error"]["code"] == "bad_request", body
    assert body["error"]["message"] and not body["error"]["message"].startswith("{"), body
