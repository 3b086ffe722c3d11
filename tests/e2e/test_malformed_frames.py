"""End-to-end: malformed text frames against a real server process (issue 11, items 5 and 9).

Deeply nested JSON is one more bad message: `error` `bad_message` on our protocol and the session
goes on; on a telephony socket it is logged and ignored and the call goes on. Invalid UTF-8 in a
text frame or a close reason fails the connection with 1007 (RFC 6455 8.1), after an `error`
frame on our protocol. Invalid frames are sent over raw sockets: clients refuse to build them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.e2e.conftest import TEST_KEY, ServerProcess, start_server
from tests.e2e.test_asr_stream import drain_to_close, recv_json, recv_until
from tests.e2e.test_telephony_e2e import ENV, MS_PER_CHAR, PATH, Peer, log_line
from tests.e2e.test_tts_stream import collect

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
MAX_JSON_DEPTH = 64  # server/flow_control/json_depth.py, as docs/protocol.md states it


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


# Deeper than msgspec descends on any supported Python, and under the 64 KiB frame limit.
DEEP = nested(30_000)
DEEP_FRAMES = [
    DEEP,
    json.dumps({"type": "keepalive"})[:-1] + f', "x": {nested(2_000)}}}',  # a skipped field
    json.dumps({"type": "keepalive"})[:-1] + f', "x": {nested(MAX_JSON_DEPTH)}}}',  # 65 levels
]


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    server = start_server(ENV)  # the echo agent answers DTMF on telephony sockets
    yield server
    code = server.stop()
    tail = "\n".join(server.stderr_lines[-40:])
    assert code == 0, f"server exited with {code}:\n{tail}"


def assert_no_traceback(srv: ServerProcess) -> None:
    bad = [line for line in srv.stderr_lines
           if any(s in line for s in ("Traceback", "RecursionError", "Fatal error"))]
    assert not bad, bad[:3]


# --- deep nesting --------------------------------------------------------------------------------


async def test_asr_deep_json_is_a_bad_message_and_the_session_goes_on(srv: ServerProcess) -> None:
    async with connect(f"{srv.ws}/v1/asr/stream?encoding=mulaw&sample_rate=8000",
                       additional_headers=AUTH, max_size=None) as ws:
        ready = await recv_json(ws)
        assert ready["type"] == "ready"
        for frame in DEEP_FRAMES:
            await ws.send(frame)
            error = await recv_until(ws, "error")
            assert error["code"] == "bad_message", error
            assert error["message"] == f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
        await ws.send(b"\xff" * 1600)  # 200 ms of mu-law silence: the session still works
        await ws.send(json.dumps({"type": "close"}))
        rest = await drain_to_close(ws)
    assert rest[-1]["type"] == "summary" and rest[-1]["audio_ms"] == 200
    assert ws.close_code == 1000
    assert_no_traceback(srv)


async def test_tts_deep_json_is_a_bad_message_and_the_session_goes_on(srv: ServerProcess) -> None:
    async with connect(f"{srv.ws}/v1/tts/stream?model=synthetic", additional_headers=AUTH,
                       max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        for frame in DEEP_FRAMES:
            await ws.send(frame)
            events, _ = await collect(ws, until="error", grant=False, timeout=10)
            assert events[-1]["code"] == "bad_message", events
            assert events[-1]["message"] == f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
        await ws.send(json.dumps({"type": "text", "text": "Still here."}))
        await ws.send(json.dumps({"type": "flush"}))
        events, audio = await collect(ws, until="flushed", grant=True, timeout=10)
        assert [e["text"] for e in events if e["type"] == "audio_done"] == ["Still here."]
        assert audio
        await ws.send(json.dumps({"type": "close"}))
        rest, _ = await collect(ws, until="summary", grant=True, timeout=10)
        assert rest[-1]["characters"] == len("Still here.")
        await asyncio.wait_for(ws.wait_closed(), 10)
    assert ws.close_code == 1000
    assert_no_traceback(srv)


async def test_telephony_deep_json_is_logged_and_ignored_and_the_call_goes_on(
        srv: ServerProcess) -> None:
    peer = await Peer.open(srv, headers=AUTH)
    try:
        await peer.ws.send(DEEP)  # the first frame: provider detection reads it too
        await peer.start()
        media = json.loads(peer._msg("media", {"track": "inbound", "chunk": "1",
                                               "timestamp": "0", "payload": base64.b64encode(
                                                   peer.silence).decode()}))
        await peer.ws.send(json.dumps(media)[:-1] + f', "x": {DEEP}}}')  # on the hot path
        await peer.ws.send(f'{{"x": {DEEP}, "event": "dtmf"}}')
        await peer.dtmf("5#")
        assert abs(await peer.reply() - 14 * MS_PER_CHAR * 8) <= 16  # "You pressed 5#"
        assert await peer.stop() == 1000
    finally:
        await peer.close()
    ended = await log_line(srv, "call ended", call_id=peer.call_sid)
    assert ended["close_code"] == 1000
    # Provider sockets get only provider messages: no `error` frame went to the peer.
    assert {m["event"] for m in peer.msgs} <= {"media", "mark", "clear"}
    warnings = [r for r in srv.logs() if "bad provider message" in str(r.get("msg"))
                and r.get("peer") == ended.get("peer")]
    assert len(warnings) == 3, warnings
    assert all("JSON nested too deeply" in str(r["msg"]) for r in warnings[1:])
    assert_no_traceback(srv)


# --- UTF-8 ---------------------------------------------------------------------------------------


class RawWs:
    """A client that sends whatever frames it is given, valid or not."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, srv: ServerProcess, path: str,
                   headers: dict[str, str] | None = None) -> RawWs:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.ws_port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write((
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n{extra}\r\n"
        ).encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    def send(self, opcode: int, payload: bytes) -> None:
        key = os.urandom(4)
        masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 126
        self.writer.write(bytes((0x80 | opcode, 0x80 | len(payload))) + key + masked)

    async def frames_until_eof(self, timeout: float = 10.0) -> list[tuple[int, bytes]]:
        """Every frame the server sends until it closes the TCP connection."""
        frames = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    head = await self.reader.readexactly(2)
                except asyncio.IncompleteReadError:
                    break
                length = head[1] & 0x7F
                if length >= 126:
                    length = int.from_bytes(
                        await self.reader.readexactly(2 if length == 126 else 8), "big")
                frames.append((head[0] & 0x0F, await self.reader.readexactly(length)))
        self.writer.close()
        return frames


def texts(frames: list[tuple[int, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(p) for op, p in frames if op == 0x1]


def close_code(frames: list[tuple[int, bytes]]) -> int:
    op, payload = frames[-1]
    assert op == 0x8, frames[-1]
    return int.from_bytes(payload[:2], "big")


BAD_TEXT = b'{"type":"keepalive","note":"caf\xe9"}'  # Latin-1, in a field nobody reads


@pytest.mark.parametrize("path", ["/v1/asr/stream", "/v1/tts/stream?model=synthetic"])
async def test_invalid_utf8_text_gets_an_error_then_1007(srv: ServerProcess, path: str) -> None:
    ws = await RawWs.open(srv, path, AUTH)
    ws.send(0x1, BAD_TEXT)
    frames = await ws.frames_until_eof()
    messages = texts(frames)
    assert messages[0]["type"] == "ready"
    assert messages[-1]["type"] == "error" and messages[-1]["code"] == "invalid_utf8"
    assert "text message is not valid UTF-8" in messages[-1]["message"]
    assert close_code(frames) == 1007
    assert_no_traceback(srv)


async def test_invalid_utf8_close_reason_gets_an_error_then_1007(srv: ServerProcess) -> None:
    ws = await RawWs.open(srv, "/v1/asr/stream", AUTH)
    ws.send(0x8, (1000).to_bytes(2, "big") + b"bye \xff")
    frames = await ws.frames_until_eof()
    messages = texts(frames)
    assert messages[-1]["type"] == "error" and messages[-1]["code"] == "invalid_utf8"
    assert "close frame reason is not valid UTF-8" in messages[-1]["message"]
    assert close_code(frames) == 1007
    assert_no_traceback(srv)


async def test_invalid_utf8_on_a_telephony_socket_closes_1007_without_our_error_frame(
        srv: ServerProcess) -> None:
    ws = await RawWs.open(srv, PATH, AUTH)
    ws.send(0x1, BAD_TEXT.replace(b'"type":"keepalive"', b'"event":"connected"'))
    frames = await ws.frames_until_eof()
    assert [op for op, _ in frames] == [0x8] and close_code(frames) == 1007
    assert_no_traceback(srv)
