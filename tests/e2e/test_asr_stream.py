"""End-to-end: a real server process, real sockets, the wire contract of docs/protocol.md."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.e2e.conftest import TEST_KEY, ServerProcess, espeak_pcm16, silence, start_server

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
FRAME_16K = 640  # 20 ms of 16 kHz PCM16


def url(server: ServerProcess, **params: Any) -> str:
    query = urlencode({k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()})
    return f"{server.ws}/v1/asr/stream" + (f"?{query}" if query else "")


async def recv_json(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(msg, str):
            return dict(json.loads(msg))


async def recv_until(ws: ClientConnection, type_: str, timeout: float = 10.0,
                     seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    while True:
        msg = await recv_json(ws, timeout)
        if seen is not None:
            seen.append(msg)
        if msg["type"] == type_:
            return msg


async def drain_to_close(ws: ClientConnection, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Read every message until the server closes; return them."""
    out: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            async for msg in ws:
                if isinstance(msg, str):
                    out.append(json.loads(msg))
    except ConnectionClosed:
        pass
    return out


async def stream_with_credit(ws: ClientConnection, audio: bytes, ready: dict[str, Any],
                             seen: list[dict[str, Any]], frame: int = FRAME_16K) -> None:
    """A well-behaved client: never more unacknowledged bytes in flight than granted."""
    credit = ready["credit_bytes"]
    sent = 0
    while sent < len(audio):
        chunk = audio[sent:sent + frame]
        while credit < len(chunk):
            msg = await recv_json(ws)
            seen.append(msg)
            if msg["type"] == "credit":
                credit += msg["bytes"]
        await ws.send(chunk)
        credit -= len(chunk)
        sent += len(chunk)


def rejection(exc: InvalidStatus) -> tuple[int, dict[str, Any]]:
    return exc.response.status_code, json.loads(exc.response.body or b"{}")


# --- handshake ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "headers", "status", "code"),
    [
        ({}, {}, 401, "unauthorized"),
        ({}, {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
        ({"model": "nope"}, AUTH, 400, "bad_request"),
        ({"encoding": "mp3"}, AUTH, 400, "bad_request"),
        ({"sample_rate": 4000}, AUTH, 400, "bad_request"),
        ({"sample_rate": "fast"}, AUTH, 400, "bad_request"),
        ({"vad": "max"}, AUTH, 400, "bad_request"),
        ({"channels": 2}, AUTH, 400, "bad_request"),
    ],
)
async def test_handshake_rejections(server: ServerProcess, params: dict[str, Any],
                                    headers: dict[str, str], status: int, code: str) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url(server, **params), additional_headers=headers):
            pass
    got_status, body = rejection(info.value)
    assert got_status == status
    assert body["error"]["code"] == code
    assert body["error"]["message"]


async def test_unknown_path_is_404(server: ServerProcess) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"{server.ws}/v1/nope", additional_headers=AUTH):
            pass
    status, body = rejection(info.value)
    assert status == 404
    assert body == {"error": {"code": "not_found", "message": "no WebSocket endpoint at /v1/nope"}}


async def test_key_by_subprotocol_and_query(server: ServerProcess) -> None:
    async with connect(url(server), subprotocols=["token", TEST_KEY]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "token"
        assert (await recv_json(ws))["type"] == "ready"
    async with connect(url(server, api_key=TEST_KEY)) as ws:
        assert (await recv_json(ws))["type"] == "ready"


# --- a session ---------------------------------------------------------------------------------


async def test_transcripts_credit_and_summary(server: ServerProcess, speech: bytes) -> None:
    async with connect(url(server, interim_results=True), additional_headers=AUTH) as ws:
        ready = await recv_json(ws)
        assert ready["type"] == "ready"
        assert ready["audio"] == {"encoding": "pcm_s16le", "sample_rate": 16000}
        assert ready["credit_bytes"] == 500 * 32  # ingest_queue_ms of 16 kHz PCM16
        assert ready["session_id"] and ready["resume_token"]
        seen: list[dict[str, Any]] = []
        await stream_with_credit(ws, speech, ready, seen)
        await ws.send(json.dumps({"type": "close"}))
        seen += await drain_to_close(ws)
        assert ws.close_code == 1000
    types = [m["type"] for m in seen]
    assert "credit" in types
    assert types[-1] == "summary"
    started = [m for m in seen if m["type"] == "speech_started"]
    finals = [m for m in seen if m["type"] == "transcript" and m["is_final"]]
    ends = [m for m in seen if m["type"] == "utterance_end"]
    assert len(started) == 1 and len(finals) == 1 and len(ends) == 1
    final = finals[0]
    assert final["text"] and final["words"]
    # The utterance is where the speech is: after the 500 ms lead-in (minus pre-roll).
    assert 150 <= final["start_ms"] <= 600
    assert final["end_ms"] > final["start_ms"] + 1000
    assert ends[0]["end_ms"] == final["end_ms"]
    assert all(final["start_ms"] <= w["start_ms"] <= w["end_ms"] for w in final["words"])
    assert types.index("speech_started") < types.index("transcript") < types.index("utterance_end")
    summary = seen[-1]
    assert summary["audio_ms"] == len(speech) // 32
    assert summary["utterances"] == 1 and summary["dropped_ms"] == 0
    assert summary["cost_micros"] > 0


async def test_finalize_forces_final(server: ServerProcess) -> None:
    audio = silence(300) + espeak_pcm16("one two three")  # no trailing silence: VAD won't end it
    async with connect(url(server), additional_headers=AUTH) as ws:
        ready = await recv_json(ws)
        seen: list[dict[str, Any]] = []
        await stream_with_credit(ws, audio, ready, seen)
        await ws.send(json.dumps({"type": "finalize"}))
        final = await recv_until(ws, "utterance_end", seen=seen)
        assert any(m["type"] == "transcript" and m["is_final"] for m in seen)
        assert final["utterance_id"] == 1
        # The session goes on after finalize.
        await ws.send(json.dumps({"type": "keepalive"}))
        await ws.send(json.dumps({"type": "close"}))
        rest = await drain_to_close(ws)
        assert rest[-1]["type"] == "summary" and rest[-1]["utterances"] == 1
        assert ws.close_code == 1000


async def test_bad_messages_do_not_end_the_session(server: ServerProcess) -> None:
    async with connect(url(server), additional_headers=AUTH) as ws:
        await recv_json(ws)
        await ws.send("{not json")
        err = await recv_until(ws, "error")
        assert err["code"] == "bad_message" and "malformed JSON" in err["message"]
        await ws.send(json.dumps({"type": "dance"}))
        assert (await recv_until(ws, "error"))["code"] == "bad_message"
        await ws.send(b"")
        assert (await recv_until(ws, "error"))["code"] == "empty_frame"
        await ws.send(silence(100))
        await ws.send(json.dumps({"type": "config", "sample_rate": 8000}))
        assert (await recv_until(ws, "error"))["code"] == "bad_message"  # config after audio
        await ws.send(json.dumps({"type": "close"}))
        rest = await drain_to_close(ws)
        assert rest[-1]["type"] == "summary" and rest[-1]["audio_ms"] == 100
        assert ws.close_code == 1000


async def test_config_message_before_audio(server: ServerProcess) -> None:
    async with connect(url(server), additional_headers=AUTH) as ws:
        first = await recv_json(ws)
        await ws.send(json.dumps({"type": "config", "encoding": "mulaw", "sample_rate": 8000}))
        second = await recv_until(ws, "ready")
        assert second["session_id"] == first["session_id"]
        assert second["audio"] == {"encoding": "mulaw", "sample_rate": 8000}
        assert second["credit_bytes"] == 500 * 8
        await ws.send(b"\xff" * 1600)  # 200 ms of mu-law silence
        await ws.send(json.dumps({"type": "close"}))
        rest = await drain_to_close(ws)
        assert rest[-1]["type"] == "summary" and rest[-1]["audio_ms"] == 200


async def test_bad_config_message_closes_4400(server: ServerProcess) -> None:
    async with connect(url(server), additional_headers=AUTH) as ws:
        await recv_json(ws)
        await ws.send(json.dumps({"type": "config", "sample_rate": 1000}))
        rest = await drain_to_close(ws)
        assert rest[-1]["type"] == "error" and rest[-1]["code"] == "bad_config"
        assert ws.close_code == 4400


async def test_frame_too_big_closes_1009(server: ServerProcess) -> None:
    async with connect(url(server), additional_headers=AUTH, max_size=None) as ws:
        await recv_json(ws)
        await ws.send(b"\x00" * 70000)
        rest = await drain_to_close(ws)
        assert rest and rest[-1]["type"] == "error" and rest[-1]["code"] == "frame_too_big"
        assert ws.close_code == 1009


async def test_idle_timeout_closes_4008(server: ServerProcess) -> None:
    async with connect(url(server), additional_headers=AUTH) as ws:
        await recv_json(ws)
        rest = await drain_to_close(ws, timeout=6)
        assert rest[-1]["type"] == "error" and rest[-1]["code"] == "idle_timeout"
        assert ws.close_code == 4008


async def test_keepalive_prevents_idle_close(server: ServerProcess) -> None:
    async with connect(url(server), additional_headers=AUTH) as ws:
        await recv_json(ws)
        for _ in range(5):  # 2.5 s > idle_timeout_s = 1.5 s
            await ws.send(json.dumps({"type": "keepalive"}))
            await asyncio.sleep(0.5)
        await ws.send(json.dumps({"type": "close"}))
        rest = await drain_to_close(ws)
        assert ws.close_code == 1000 and rest[-1]["type"] == "summary"


async def test_engine_failure_is_reported_and_session_survives(server: ServerProcess,
                                                               speech: bytes) -> None:
    async with connect(url(server, model="synthetic-failing"), additional_headers=AUTH) as ws:
        ready = await recv_json(ws)
        seen: list[dict[str, Any]] = []
        await stream_with_credit(ws, speech, ready, seen)
        await ws.send(json.dumps({"type": "close"}))
        seen += await drain_to_close(ws)
    errors = [m for m in seen if m["type"] == "error"]
    assert errors and errors[0]["code"] == "engine_error" and errors[0]["retryable"]
    assert seen[-1]["type"] == "summary"
    assert ws.close_code == 1000


# --- a client that ignores credit ----------------------------------------------------------------


async def _flood(server: ServerProcess, overflow: str, seconds: int) -> list[dict[str, Any]]:
    frame = silence(10) + (b"\x10\x00" * 160 * 2)[: FRAME_16K - 320]  # 20 ms, not silent
    assert len(frame) == FRAME_16K
    total_frames = seconds * 50
    seen: list[dict[str, Any]] = []
    async with connect(url(server, model="synthetic-slow", vad="off", overflow=overflow),
                       additional_headers=AUTH) as ws:
        await recv_json(ws)

        async def reader() -> None:
            async for msg in ws:
                if isinstance(msg, str):
                    seen.append(json.loads(msg))

        read_task = asyncio.create_task(reader())
        for _ in range(total_frames):
            await ws.send(frame)  # as fast as the socket takes it; credit ignored
        await ws.send(json.dumps({"type": "close"}))
        try:
            await asyncio.wait_for(read_task, 60)
        except ConnectionClosed:
            pass
        assert ws.close_code == 1000
    return seen


async def test_flood_with_block_loses_nothing(server: ServerProcess) -> None:
    seen = await _flood(server, "block", 60)
    summary = seen[-1]
    assert summary["type"] == "summary"
    assert summary["audio_ms"] == 60000
    assert summary["dropped_ms"] == 0
    assert any(m["type"] == "warning" and m["code"] == "credit_exceeded" for m in seen)


async def test_flood_with_drop_accounts_for_every_ms(server: ServerProcess) -> None:
    seen = await _flood(server, "drop", 60)
    summary = seen[-1]
    assert summary["type"] == "summary"
    assert summary["dropped_ms"] > 0
    assert summary["audio_ms"] + summary["dropped_ms"] == 60000
    warned = sum(m.get("dropped_ms", 0) for m in seen
                 if m["type"] == "warning" and m["code"] == "audio_dropped")
    assert warned == summary["dropped_ms"]
    assert summary["billed_ms"] == summary["audio_ms"]


# --- HTTP side -----------------------------------------------------------------------------------


def test_health_ready_and_metrics(server: ServerProcess) -> None:
    from websockets.sync.client import connect as sync_connect

    with pytest.raises(InvalidStatus):  # one rejected upgrade, so the counter has a sample
        sync_connect(url(server), open_timeout=5)
    with urllib.request.urlopen(f"{server.http}/healthz", timeout=5) as resp:
        assert json.load(resp) == {"status": "ok"}
    with urllib.request.urlopen(f"{server.http}/readyz", timeout=5) as resp:
        assert json.load(resp)["status"] == "ready"
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert "streamgate_sessions_active" in text
    assert 'streamgate_upgrades_rejected_total{status="401"}' in text


# --- drain -------------------------------------------------------------------------------------


async def test_sigterm_drains_with_1001() -> None:
    srv = start_server({"STREAMGATE_SERVER__DRAIN_TIMEOUT_S": "0.2"})
    try:
        # A slow engine keeps the session's finals pending, so the drain takes a while.
        async with connect(url(srv, model="synthetic-stuck"), additional_headers=AUTH) as ws:
            ready = await recv_json(ws)
            seen: list[dict[str, Any]] = []
            await stream_with_credit(ws, silence(300) + espeak_pcm16("drain me"), ready, seen)
            srv.proc.send_signal(15)
            await asyncio.sleep(0.3)
            with pytest.raises(InvalidStatus) as info:  # the node refuses new sessions
                async with connect(url(srv), additional_headers=AUTH):
                    pass
            assert rejection(info.value)[0] == 503
            seen += await drain_to_close(ws)
            assert ws.close_code == 1001
        types = [m["type"] for m in seen]
        # Finals of the open utterance are flushed before the node lets go of the client.
        assert "utterance_end" in types
        assert types[-2:] == ["summary", "error"] and seen[-1]["code"] == "draining"
        assert srv.proc.wait(10) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


def test_rejections_are_logged_without_keys(server: ServerProcess) -> None:
    try:
        urllib.request.urlopen(f"{server.http}/nope", timeout=5)
    except urllib.error.HTTPError:
        pass
    text = "\n".join(server.stderr_lines)
    assert TEST_KEY not in text


# --- bad clients never disturb good ones ---------------------------------------------------------


async def _garbage_tcp(server: ServerProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ws_port)
    writer.write(b"\x16\x03\x01 this is not HTTP at all\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.read(), 5)  # the server answers or hangs up; it must not crash
    writer.close()
    await writer.wait_closed()


async def _vanishing_client(server: ServerProcess) -> None:
    ws = await connect(url(server), additional_headers=AUTH)
    await recv_json(ws)
    for _ in range(10):
        await ws.send(silence(20))
    ws.transport.abort()  # no close frame, no FIN handshake: the client just disappears


async def _bad_wav(server: ServerProcess) -> int | None:
    async with connect(url(server, encoding="wav"), additional_headers=AUTH) as ws:
        await recv_json(ws)
        await ws.send(b"RIFF\x00\x00\x00\x00WAVEjunk" + b"\x00" * 5000)
        await drain_to_close(ws)
        return ws.close_code


async def test_bad_clients_do_not_disturb_a_good_session(server: ServerProcess,
                                                         speech: bytes) -> None:
    async def good() -> list[dict[str, Any]]:
        async with connect(url(server), additional_headers=AUTH) as ws:
            ready = await recv_json(ws)
            seen: list[dict[str, Any]] = []
            await stream_with_credit(ws, speech, ready, seen)
            await ws.send(json.dumps({"type": "close"}))
            seen += await drain_to_close(ws)
            assert ws.close_code == 1000
            return seen

    good_task = asyncio.create_task(good())
    results = await asyncio.gather(
        _garbage_tcp(server), _vanishing_client(server), _bad_wav(server),
        _flood(server, "drop", 5), return_exceptions=True,
    )
    seen = await good_task
    assert results[2] == 4400
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert seen[-1]["type"] == "summary" and seen[-1]["audio_ms"] == len(speech) // 32
    assert [m["type"] for m in seen].count("utterance_end") == 1
    # The server is still there and healthy afterwards.
    assert await asyncio.to_thread(_http_status, f"{server.http}/healthz") == 200


def _http_status(address: str) -> int:
    with urllib.request.urlopen(address, timeout=5) as resp:
        return int(resp.status)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_flooding_clients_keep_server_memory_bounded(server: ServerProcess) -> None:
    """Eight clients flood 60 s each at once, ignoring credit: queues stay bounded, so the
    server's memory grows by far less than the audio they pushed (8 x 1.9 MB)."""
    await _flood(server, "block", 2)  # warm up allocators and engine paths first
    before = _rss_kib(server.proc.pid)
    results = await asyncio.gather(*[_flood(server, "block", 60) for _ in range(8)])
    after = _rss_kib(server.proc.pid)
    assert all(r[-1]["audio_ms"] == 60000 for r in results)
    assert after - before < 12 * 1024, f"RSS grew {after - before} KiB"


async def test_a_client_held_back_by_back_pressure_is_not_idle(server: ServerProcess) -> None:
    """A client that ignores credit on a slow engine, and reads what it is sent: the server
    stops reading it for longer than `idle_timeout_s` (1.5 s here). That is our back pressure,
    not the client going quiet: the session goes on, every utterance gets its final, and it
    closes 1000 (it used to close 4008 idle_timeout with the client's audio unread in the
    socket). (A client that reads nothing either is ended by the idle clock: nothing moves.)"""
    phrase = silence(300) + espeak_pcm16("one two three four five") + silence(900)
    async with connect(url(server, model="synthetic-stuck", interim_results=False),
                       additional_headers=AUTH, max_size=2**22) as ws:
        await recv_json(ws)
        reading = asyncio.create_task(drain_to_close(ws, timeout=40))
        audio = phrase * 3  # ~9 s of engine time (1.5 s a call): reading paused >> 1.5 s
        for i in range(0, len(audio), 3200):
            await ws.send(audio[i:i + 3200])  # no credit honoured: a flood
        await ws.send(json.dumps({"type": "close"}))
        seen = await reading
    assert ws.close_code == 1000, seen[-3:]
    finals = [m for m in seen if m["type"] == "transcript" and m["is_final"]]
    assert len(finals) == 3 and seen[-1]["type"] == "summary"
