"""Request bodies that never arrive, on the HTTP port, against a real server process over raw
sockets: a client that promises more body than it sends must not leave a task behind or hold
up a SIGTERM, and a stalled upload gets 408 JSON after `server.http_body_timeout_s`.

Every server here runs with STREAMGATE_STRICT_TASKS=1 (conftest): exit code 3 means a task was
left at shutdown; the exit code is checked after every SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web

from server.http.app import build_http_app
from server.telemetry.metrics import Metrics
from streamgate_protocol.audio import wav_header
from tests.e2e.conftest import TEST_KEY, ServerProcess, espeak_pcm16, silence, start_server

pytestmark = pytest.mark.e2e
DRAIN_TIMEOUT_S = 5.0  # tests/e2e/server.toml
# What a SIGTERM may take beyond the drain window: process exit, engines, a noisy machine.
EXIT_SLACK_S = 3.0
PROMISED = 1_000_000  # Content-Length sent; only a few bytes of it follow
BOUNDARY = "stalledboundary"


@dataclass(frozen=True)
class Request:
    name: str
    path: str
    content_type: str
    first_bytes: bytes  # what is sent of the body before the client goes quiet
    content_length: int = PROMISED


# Routes that answer before reading the body (a refused type, a declared size over the limit).
EARLY_REFUSALS = [
    Request("transcribe: unsupported type", "/v1/asr/transcribe", "application/json",
            b"0123456789"),
    Request("vision: unsupported type", "/v1/vision/extract", "application/json",
            b"0123456789"),
    # 1,000,000 bytes fit llm.max_request_bytes (1 MiB): 2 MB is refused unread.
    Request("chat: declared too large", "/v1/chat/completions", "application/json",
            b"0123456789", 2_000_000),
]


def _form_head(content_type: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"a.wav\"\r\nContent-Type: {content_type}\r\n\r\n").encode()


_WAV_HEAD = wav_header(16000, 1, 16000 * 30)
# Routes that read the body as it arrives: the client stops sending part-way.
STALLED_UPLOADS = [
    Request("transcribe: raw WAV", "/v1/asr/transcribe", "audio/wav", _WAV_HEAD[:10]),
    Request("transcribe: form", "/v1/asr/transcribe",
            f"multipart/form-data; boundary={BOUNDARY}",
            _form_head("audio/wav") + _WAV_HEAD + bytes(64)),
    Request("vision: PNG", "/v1/vision/extract", "image/png", b"\x89PNG\r\n\x1a\n"),
    Request("chat", "/v1/chat/completions", "application/json", b'{"model": "x", "mess'),
]


def _head(req: Request) -> bytes:
    return (f"POST {req.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {TEST_KEY}\r\nContent-Type: {req.content_type}\r\n"
            f"Content-Length: {req.content_length}\r\n\r\n").encode()


def send_partial(srv: ServerProcess, req: Request) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.http_port), timeout=10)
    sock.sendall(_head(req) + req.first_bytes)
    return sock


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, object]


def read_answer(sock: socket.socket, timeout: float) -> Answer:
    """One HTTP/1.1 response with a Content-Length, read within `timeout` seconds."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the answer's body"
        rest += chunk
    return Answer(int(status_line.split()[1]), headers, json.loads(rest[:length]))


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed the connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def stop_within_drain(srv: ServerProcess) -> int:
    """SIGTERM, then the exit code; fails if the server outlives its drain window."""
    srv.proc.send_signal(signal.SIGTERM)
    try:
        return srv.proc.wait(DRAIN_TIMEOUT_S + EXIT_SLACK_S)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()
        tail = "\n".join(srv.stderr_lines[-20:])
        raise AssertionError(
            f"still running {DRAIN_TIMEOUT_S + EXIT_SLACK_S} s after SIGTERM:\n{tail}") from None


def problems_in_log(srv: ServerProcess) -> list[str]:
    return [line for line in srv.stderr_lines
            if "Traceback" in line or "leaked task" in line or "Unhandled exception" in line
            or '"level":"error"' in line]


@contextmanager
def serving(env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    srv = start_server(env)
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


@pytest.mark.parametrize("client", ["hangs_up", "stays_silent"])
def test_early_refusal_of_a_short_body_leaves_nothing_at_sigterm(client: str) -> None:
    """Each route answers at once; the client then hangs up (or says nothing more) with most of
    its promised body unsent. SIGTERM right after: exit 0 (no task left) within the drain."""
    with serving() as srv:
        socks = []
        for req in EARLY_REFUSALS:
            sock = send_partial(srv, req)
            answer = read_answer(sock, timeout=10)
            assert 400 <= answer.status < 500, (req.name, answer)
            assert set(answer.body) == {"error"}, (req.name, answer)
            if client == "hangs_up":
                sock.close()
            socks.append(sock)
        code = stop_within_drain(srv)
        for sock in socks:
            sock.close()
        assert code == 0, "\n".join(srv.stderr_lines[-20:])
        assert problems_in_log(srv) == []


def test_early_refusal_closes_the_connection_once_the_answer_is_read() -> None:
    """An answer sent before the body was read says `Connection: close`, and a silent client's
    connection is closed by the server after a short linger, not held for the promised body."""
    with serving() as srv:
        req = EARLY_REFUSALS[0]
        sock = send_partial(srv, req)
        answer = read_answer(sock, timeout=10)
        assert answer.status == 415 and answer.headers.get("connection") == "close", answer
        assert closed_by_server(sock, timeout=10)
        sock.close()
        assert stop_within_drain(srv) == 0
        assert problems_in_log(srv) == []


def test_stalled_upload_gets_408_json_and_is_closed() -> None:
    with serving({"STREAMGATE_SERVER__HTTP_BODY_TIMEOUT_S": "1"}) as srv:
        socks = [(req, send_partial(srv, req)) for req in STALLED_UPLOADS]
        for req, sock in socks:
            answer = read_answer(sock, timeout=15)
            assert answer.status == 408, (req.name, answer)
            assert answer.body["error"] == {
                "code": "request_timeout",
                "message": "no request body bytes arrived for 1 s; the request is dropped",
            }, req.name
            assert answer.headers.get("connection") == "close", (req.name, answer.headers)
            assert closed_by_server(sock, timeout=10), req.name
            sock.close()
        assert stop_within_drain(srv) == 0
        assert problems_in_log(srv) == []


def test_a_slow_upload_that_keeps_sending_is_not_cut() -> None:
    """The timeout is on silence, not on the whole body: a WAV sent in pieces with pauses
    shorter than the timeout (but longer in total) is transcribed."""
    pcm = silence(300) + espeak_pcm16("one two three") + silence(800)
    wav = wav_header(16000, 1, len(pcm) // 2) + pcm
    with serving({"STREAMGATE_SERVER__HTTP_BODY_TIMEOUT_S": "1.5"}) as srv:
        req = Request("transcribe: slow", "/v1/asr/transcribe?model=synthetic", "audio/wav",
                      b"", len(wav))
        sock = send_partial(srv, req)
        pieces = [wav[i:i + len(wav) // 6 + 1] for i in range(0, len(wav), len(wav) // 6 + 1)]
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.4)  # the client's own pace: 6 pauses, 2.4 s in all, each < 1.5 s
        answer = read_answer(sock, timeout=30)
        assert answer.status == 200, answer
        assert answer.body["text"], answer
        sock.close()
        assert stop_within_drain(srv) == 0
        assert problems_in_log(srv) == []


async def test_the_servers_own_back_pressure_is_not_a_stall() -> None:
    """In process, the body middleware of server/http/app.py under a handler that stops reading
    (as a full transcription pipeline does) for four times the body timeout while the client
    has far more to send than aiohttp buffers: no bytes arrive meanwhile (reading is paused),
    and the request still succeeds, because only time spent waiting on the client counts."""
    timeout_s, not_reading_s = 0.5, 2.0
    body = bytes(8 * 1024 * 1024)  # far beyond aiohttp's read buffer and the socket buffers
    seen: dict[str, int] = {}

    async def slow_reader(request: web.Request) -> web.Response:
        await asyncio.sleep(not_reading_s)  # the handler's own pace: its pipeline is full
        seen["arrived_while_not_reading"] = request.content.total_bytes
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response({"bytes": size})

    app = build_http_app(Metrics(), lambda: (True, ""), body_timeout_s=timeout_s)
    app.router.add_post("/slow", slow_reader)
    runner = web.AppRunner(app, access_log=None, lingering_time=0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        async with asyncio.timeout(30):
            await writer.drain()
            answer = await reader.read()
        writer.close()
    finally:
        await runner.cleanup()
    # The premise: reading was paused, so a clock on arriving bytes would have fired.
    assert seen["arrived_while_not_reading"] < len(body) // 2
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(payload) == {"bytes": len(body)}


def test_sigterm_during_stalled_uploads_ends_them_within_the_drain() -> None:
    """The body timeout (default 30 s) is longer than the drain: the drain itself ends the
    in-flight requests with a JSON 503 `draining`, and the process exits 0 in the window."""
    with serving() as srv:
        socks = [(req, send_partial(srv, req)) for req in STALLED_UPLOADS]
        time.sleep(0.5)  # let each handler reach its wait for the body
        code = stop_within_drain(srv)
        assert code == 0, "\n".join(srv.stderr_lines[-20:])
        for req, sock in socks:
            answer = read_answer(sock, timeout=5)
            assert answer.status == 503, (req.name, answer)
            assert answer.body["error"]["code"] == "draining", (  # type: ignore[index]
                req.name, answer)
            sock.close()
        assert problems_in_log(srv) == []

