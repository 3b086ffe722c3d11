"""End-to-end telephony: a real server process, a peer speaking Twilio's (or Exotel's) media
stream protocol over a real socket, real speech, the echo agent and the synthetic TTS model.

The peer behaves as the provider does: media every 20 ms at real time for the whole call,
agent audio played out at real time with each mark echoed once the audio before it has played,
`clear` drops what is unplayed and echoes its marks at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import sys
import time
import uuid
import wave
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamgate_protocol.audio import pcm16_to_ulaw
from tests.e2e.conftest import TEST_KEY, ServerProcess, espeak_pcm16, silence, start_server

pytestmark = pytest.mark.e2e
PATH = "/v1/telephony/twilio"
MS_PER_CHAR = 60  # [tts.models.synthetic] ms_per_char: agent audio per reply character
# Every peer here sends `start` as soon as its socket is open; the short start timeout keeps the
# test of a call that never starts from waiting out the 5 s default.
START_TIMEOUT_S = 1.0
ENV = {"STREAMGATE_TELEPHONY__TTS_MODEL": "synthetic",
       "STREAMGATE_TELEPHONY__AGENT__KIND": "echo",
       "STREAMGATE_TELEPHONY__START_TIMEOUT_S": str(START_TIMEOUT_S)}


def speech(text: str, rate: int = 8000) -> bytes:
    return espeak_pcm16(text, rate) + silence(900, rate)


def log_lines(srv: ServerProcess, msg: str, **match: Any) -> list[dict[str, Any]]:
    return [r for r in srv.logs()
            if r.get("msg") == msg and all(r.get(k) == v for k, v in match.items())]


async def log_line(srv: ServerProcess, msg: str, timeout_s: float = 5.0,
                   **match: Any) -> dict[str, Any]:
    """The one line a call or session writes as it ends: the server may write it just after
    the peer saw the close, so wait for it (a second one is still an error)."""
    deadline = time.monotonic() + timeout_s
    while not (lines := log_lines(srv, msg, **match)) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    [line] = lines
    return line


class Peer:
    """A provider's side of one call (Twilio, or Exotel's snake_case PCM16 dialect)."""

    def __init__(self, ws: ClientConnection, dialect: str = "twilio") -> None:
        self.ws, self.dialect = ws, dialect
        self.sid = ("MZ" if dialect == "twilio" else "") + uuid.uuid4().hex
        self.call_sid = "CA" + uuid.uuid4().hex
        self.rate_bytes = 8000 if dialect == "twilio" else 16000  # bytes per second of audio
        self.frame = self.rate_bytes // 50
        self.silence = (b"\xff" if dialect == "twilio" else b"\x00") * self.frame
        self.msgs: list[dict[str, Any]] = []
        self.caller: deque[bytes] = deque()
        self.frames_sent = 0
        self.play: deque[bytes | str] = deque()
        self.received = self.acked = self.max_unacked = 0
        self.cum: dict[str, int] = {}  # mark name -> bytes received up to it
        self.echoed: list[str] = []
        self.last_media = 0.0
        self.changed = asyncio.Event()
        self._cleared = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, srv: ServerProcess, query: str = "", dialect: str = "twilio",
                   headers: dict[str, str] | None = None) -> Peer:
        ws = await connect(srv.ws + PATH + query, additional_headers=headers, open_timeout=10)
        return cls(ws, dialect)

    def _msg(self, event: str, body: dict[str, Any] | None = None) -> str:
        sid = "streamSid" if self.dialect == "twilio" else "stream_sid"
        msg: dict[str, Any] = {"event": event, sid: self.sid}
        if body is not None:
            msg[event] = body
        return json.dumps(msg)

    async def start(self, params: dict[str, str] | None = None, media: bool = True) -> None:
        if self.dialect == "twilio":
            await self.ws.send(json.dumps({"event": "connected", "protocol": "Call",
                                           "version": "1.0.0"}))
            body = {"streamSid": self.sid, "callSid": self.call_sid, "tracks": ["inbound"],
                    "customParameters": params or {},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                    "channels": 1}}
        else:
            await self.ws.send(json.dumps({"event": "connected"}))
            body = {"stream_sid": self.sid, "call_sid": self.call_sid, "account_sid": "x",
                    "custom_parameters": params or {},
                    "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000"}}
        await self.ws.send(self._msg("start", body))
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._player())]
        if media:
            self._tasks.append(asyncio.create_task(self._media()))

    def say(self, pcm16_8k: bytes) -> None:
        audio = pcm16_to_ulaw(np.frombuffer(pcm16_8k, dtype="<i2")) if self.dialect == "twilio" \
            else pcm16_8k
        self.caller.extend(audio[i:i + self.frame] for i in range(0, len(audio), self.frame))

    async def dtmf(self, digits: str) -> None:
        for d in digits:
            await self.ws.send(self._msg("dtmf", {"digit": d}))

    async def _media(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            frame = (self.caller.popleft() if self.caller else self.silence).ljust(
                self.frame, self.silence[:1])
            await self.ws.send(self._msg("media", {
                "track": "inbound", "chunk": self.frames_sent + 1,
                "timestamp": str(self.frames_sent * 20),
                "payload": base64.b64encode(frame).decode()}))
            self.frames_sent += 1
            await asyncio.sleep(max(0.0, t0 + self.frames_sent * 0.02 - loop.time()))

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                msg = json.loads(raw)
                self.msgs.append(msg)
                if msg["event"] == "media":
                    data = base64.b64decode(msg["media"]["payload"])
                    self.received += len(data)
                    self.max_unacked = max(self.max_unacked, self.received - self.acked)
                    self.play.append(data)
                    self.last_media = time.monotonic()
                elif msg["event"] == "mark":
                    self.cum[msg["mark"]["name"]] = self.received
                    self.play.append(msg["mark"]["name"])
                elif msg["event"] == "clear":
                    self._cleared.set()
                    while self.play:
                        item = self.play.popleft()
                        if isinstance(item, str):
                            await self._echo(item)
                self.changed.set()

    async def _echo(self, name: str) -> None:
        self.acked = max(self.acked, self.cum.get(name, 0))
        self.echoed.append(name)
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(self._msg("mark", {"name": name}))
        self.changed.set()

    async def _player(self) -> None:
        while True:
            if not self.play:
                await asyncio.sleep(0.005)
                continue
            item = self.play.popleft()
            if isinstance(item, str):
                await self._echo(item)
                continue
            self._cleared.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cleared.wait(), len(item) / self.rate_bytes)

    async def wait(self, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.05)

    def quiet(self) -> bool:
        """The agent is done: everything received was played and echoed, nothing new."""
        return not self.play and self.acked == self.received and \
            time.monotonic() - self.last_media > 0.5

    async def reply(self, timeout: float = 10.0) -> int:
        """Wait for the next reply to start and finish playing; returns its audio bytes."""
        before = self.received
        await self.wait(lambda: self.received > before, timeout)
        await self.wait(self.quiet, timeout)
        return self.received - before

    async def stop(self) -> int | None:
        self._tasks[-1].cancel()  # no media after stop
        await self.ws.send(self._msg("stop", {"callSid": self.call_sid, "call_sid": "x"}))
        await asyncio.wait_for(self.ws.wait_closed(), 15)
        return await self.close()

    async def close(self) -> int | None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.ws.close()
        return self.ws.close_code

    def events(self) -> list[str]:
        return [m["event"] for m in self.msgs]


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    server = start_server(ENV)
    yield server
    code = server.stop()
    tail = "\n".join(server.stderr_lines[-40:])
    assert code == 0, f"server exited with {code}:\n{tail}"


def assert_valid_twilio_outbound(peer: Peer) -> None:
    """Only media, mark and clear; each media followed by its mark; Twilio's exact shapes."""
    expect_mark = False
    for msg in peer.msgs:
        assert msg["streamSid"] == peer.sid, msg
        if msg["event"] == "media":
            assert not expect_mark, "two media messages without a mark between them"
            assert set(msg) == {"event", "streamSid", "media"} and set(msg["media"]) == {"payload"}
            assert base64.b64decode(msg["media"]["payload"], validate=True)
            expect_mark = True
        elif msg["event"] == "mark":
            assert expect_mark, "a mark without media before it"
            assert set(msg) == {"event", "streamSid", "mark"}
            assert isinstance(msg["mark"]["name"], str) and msg["mark"]["name"]
            expect_mark = False
        else:
            assert msg == {"event": "clear", "streamSid": peer.sid}, msg


# --- a whole call ------------------------------------------------------------------------------


async def test_call_speech_reply_dtmf_stop_with_key_in_custom_parameters(
        srv: ServerProcess) -> None:
    peer = await Peer.open(srv)  # no headers, as Twilio connects
    try:
        await peer.start({"api_key": TEST_KEY, "caller": "+15550100"})
        peer.say(silence(300, 8000) + speech("hello there, how are you today"))
        first = await peer.reply()
        await peer.dtmf("12#")
        second = await peer.reply()
        assert await peer.stop() == 1000
    finally:
        await peer.close()
    assert_valid_twilio_outbound(peer)
    assert "clear" not in peer.events()
    assert peer.echoed == [m["mark"]["name"] for m in peer.msgs if m["event"] == "mark"]
    # Marks are credit: never more than the 1 s window (8000 bytes) unacknowledged.
    assert 0 < peer.max_unacked <= 8000
    # "You pressed 12#": 15 characters of synthetic speech, 60 ms each, at 8 kHz mu-law.
    assert abs(second - 15 * MS_PER_CHAR * 8) <= 16
    ended = await log_line(srv, "call ended", call_id=peer.call_sid)
    played = log_lines(srv, "reply played", call_id=peer.call_sid)
    assert [r["reply_chars"] for r in played][1] == 15
    assert abs(first - played[0]["reply_chars"] * MS_PER_CHAR * 8) <= 16
    assert ended["close_code"] == 1000 and ended["turns"] == 2 and ended["barge_ins"] == 0
    # Both directions metered once: caller audio as accepted (all of it, nothing dropped) and
    # agent characters as spoken; one ASR session settled for the call.
    assert ended["tts_characters"] == sum(r["reply_chars"] for r in played)
    assert ended["asr_audio_ms"] == peer.frames_sent * 20 and ended["asr_dropped_ms"] == 0
    asr = await log_line(srv, "session ended", session_id=ended["session_id"])
    assert asr["audio_ms"] == ended["asr_audio_ms"]
    assert ended["tts_cost_micros"] == ended["tts_characters"]  # 1000 micros per 1k chars


async def test_barge_in_clears_the_reply_and_reports_what_was_played(srv: ServerProcess) -> None:
    peer = await Peer.open(srv)
    try:
        await peer.start({"api_key": TEST_KEY})
        peer.say(silence(300, 8000) + speech("hello there, how are you today"))
        await peer.wait(lambda: len(peer.echoed) >= 3)  # the reply is playing
        peer.say(speech("wait, stop please"))  # the caller talks over it
        await peer.wait(lambda: "clear" in peer.events(), 5)
        cleared_at = peer.events().index("clear")
        second = await peer.reply()
        assert await peer.stop() == 1000
    finally:
        await peer.close()
    assert_valid_twilio_outbound(peer)
    assert peer.events().count("clear") == 1
    before = [m for m in peer.msgs[:cleared_at] if m["event"] == "mark"]
    after = [m for m in peer.msgs[cleared_at:] if m["event"] == "mark"]
    assert before and after and second > 0
    prefix = before[0]["mark"]["name"].split("-")[0]
    assert all(not m["mark"]["name"].startswith(prefix + "-") for m in after)
    [barge] = log_lines(srv, "barge-in", call_id=peer.call_sid)
    assert barge["cause"] == "speech"
    assert 0 < barge["played_ms"] < barge["sent_ms"]
    assert 0 < barge["played_chars"] < barge["reply_chars"]
    ended = await log_line(srv, "call ended", call_id=peer.call_sid)
    assert ended["barge_ins"] == 1 and ended["turns"] == 2


# --- admission ----------------------------------------------------------------------------------


async def test_no_start_within_the_start_timeout_closes_4001_without_any_message(
    srv: ServerProcess,
) -> None:
    ws = await connect(srv.ws + PATH, open_timeout=10)
    host, port = ws.local_address[:2]
    await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    got = []
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(10):
            async for raw in ws:
                got.append(raw)
    assert got == []  # nothing but the provider's protocol: no JSON error frame
    assert ws.close_code == 4001
    # The start timer closed it, with the configured timeout (not the key check, not idleness).
    await log_line(srv, f"no valid start event with a valid key within {START_TIMEOUT_S:g} s",
                   peer=f"{host}:{port}")


@pytest.mark.parametrize("params", [{"api_key": "wrong"}, {}])
async def test_start_without_a_valid_key_closes_4001(srv: ServerProcess,
                                                     params: dict[str, str]) -> None:
    peer = await Peer.open(srv)
    try:
        await peer.start(params, media=False)
        await asyncio.wait_for(peer.ws.wait_closed(), 5)
    finally:
        await peer.close()
    assert peer.ws.close_code == 4001 and peer.msgs == []
    # Refused by the key check on `start`, not left to the start timer.
    await log_line(srv, "start event without a valid api_key", call_id=peer.call_sid)


async def test_key_at_the_upgrade_and_bad_upgrades(srv: ServerProcess) -> None:
    peer = await Peer.open(srv, headers={"Authorization": f"Bearer {TEST_KEY}"})
    try:
        await peer.start()
        await peer.dtmf("5#")
        assert abs(await peer.reply() - 14 * MS_PER_CHAR * 8) <= 16  # "You pressed 5#"
        assert await peer.stop() == 1000
    finally:
        await peer.close()
    for headers, query, status in (({"Authorization": "Bearer nope"}, "", 401),
                                   ({}, "?provider=bogus", 400)):
        with pytest.raises(InvalidStatus) as exc:
            await connect(srv.ws + PATH + query, additional_headers=headers, open_timeout=10)
        assert exc.value.response.status_code == status


async def test_exotel_dialect_is_detected_and_paced_in_its_chunk_sizes(
        srv: ServerProcess) -> None:
    peer = await Peer.open(srv, dialect="exotel")
    try:
        await peer.start({"api_key": TEST_KEY})
        await peer.dtmf("7#")
        got = await peer.reply()
        assert await peer.stop() == 1000
    finally:
        await peer.close()
    media = [base64.b64decode(m["media"]["payload"]) for m in peer.msgs if m["event"] == "media"]
    assert all(m["stream_sid"] == peer.sid for m in peer.msgs)
    # Exotel: PCM16 8 kHz, chunks in multiples of 320 bytes and at least 3.2 KB (the last one
    # of a reply may be shorter).
    assert all(len(m) % 320 == 0 and len(m) >= 3200 for m in media[:-1])
    assert abs(got - 14 * MS_PER_CHAR * 16) <= 32  # "You pressed 7#", 16 bytes per ms


# --- the command-line simulator -----------------------------------------------------------------


def test_call_sim_cli(srv: ServerProcess, tmp_path: Path) -> None:
    wav_in, wav_out = tmp_path / "caller.wav", tmp_path / "agent.wav"
    with wave.open(str(wav_in), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(silence(300) + espeak_pcm16("good morning, this is a test") + silence(600))
    proc = subprocess.run(
        [sys.executable, "-m", "streamgate_client.call_sim", str(wav_in), "--url", srv.ws + PATH,
         "--key", TEST_KEY, "--dtmf", "3#", "--out", str(wav_out)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("agent: done") == 2, proc.stdout
    assert "close 1000" in proc.stdout
    with wave.open(str(wav_out), "rb") as w:
        heard_ms = w.getnframes() * 1000 // w.getframerate()
    assert heard_ms >= 13 * MS_PER_CHAR  # at least "You pressed 3#" was heard


# --- what the agent is told: webhook agent, barge-in, history -----------------------------------

LONG_REPLY = ("This is a long answer. It has several sentences in it. Each one takes a while "
              "to say. The caller will not hear all of them.")


async def test_webhook_agent_hears_the_truncated_reply_after_a_barge_in() -> None:
    from aiohttp import web

    turns: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.StreamResponse:
        turns.append(await request.json())
        if len(turns) == 3:
            return web.Response(status=500, text="agent down")  # logged; the call goes on
        if len(turns) > 1:
            return web.json_response({"text": "Okay."})
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        for sentence in LONG_REPLY.split(". "):  # streamed: speech starts on the first one
            await resp.write(sentence.encode() + b". ")
            await asyncio.sleep(0.05)
        return resp

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    server = start_server({**ENV, "STREAMGATE_TELEPHONY__AGENT__KIND": "webhook",
                           "STREAMGATE_TELEPHONY__AGENT__URL": f"http://{host}:{port}/hook"})
    try:
        peer = await Peer.open(server)
        try:
            await peer.start({"api_key": TEST_KEY})
            peer.say(silence(300, 8000) + speech("hello there, how are you today"))
            await peer.wait(lambda: len(peer.echoed) >= 12)  # 1.2 s of the answer played
            peer.say(speech("wait, stop please"))
            await peer.wait(lambda: "clear" in peer.events(), 5)
            await peer.reply()
            await peer.dtmf("8#")
            await peer.wait(lambda: len(turns) == 3)
            await asyncio.sleep(0.5)
            await peer.dtmf("9#")
            await peer.reply()
            assert await peer.stop() == 1000
        finally:
            await peer.close()
    finally:
        code = server.stop()
        await runner.cleanup()
    assert code == 0, "\n".join(server.stderr_lines[-30:])
    assert [t["call_id"] for t in turns] == [peer.call_sid] * 4
    assert {t["stream_id"] for t in turns} == {peer.sid}
    assert turns[0]["text"] and turns[0]["dtmf"] is None and turns[0]["history"] == []
    caller1, agent1 = turns[1]["history"]
    assert caller1 == {"role": "caller", "text": turns[0]["text"], "interrupted": False}
    assert agent1["role"] == "agent" and agent1["interrupted"] is True
    # What was heard (from the echoed marks), not what was sent: a word-aligned prefix.
    assert 0 < len(agent1["text"]) < len(LONG_REPLY) and LONG_REPLY.startswith(agent1["text"])
    assert turns[2]["dtmf"] == "8#" and turns[2]["text"] is None
    assert turns[2]["history"][2:] == [
        {"role": "caller", "text": turns[1]["text"], "interrupted": False},
        {"role": "agent", "text": "Okay.", "interrupted": False}]
    assert turns[3]["dtmf"] == "9#"  # after the failed turn: no agent entry for it
    assert turns[3]["history"][4:] == [
        {"role": "caller", "text": "(pressed keys: 8#)", "interrupted": False}]
    [failed] = log_lines(server, "agent failed: webhook answered HTTP 500: agent down")
    assert failed["call_id"] == peer.call_sid


# --- money: both directions charged exactly once ------------------------------------------------


async def test_billing_charges_caller_audio_and_agent_characters_once(
        redis_url: str, database_url: str) -> None:
    from server.infra.embedded import create_database, drop_database
    from tests.e2e.test_billing_e2e import (
        Admin,
        assert_books_balance,
        billing_env,
        cleanup_redis,
        with_redis_db,
    )

    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = await create_database(database_url, name)
    rurl = with_redis_db(redis_url, 9)
    server = start_server(billing_env(rurl, dsn, telephony__tts_model="synthetic"))
    admin = Admin(server.http)
    try:
        status, body, _ = admin.call("PUT", "/admin/prices/synthetic/characters",
                                     {"micros_per_block": 2000, "block_units": 1000})
        assert status == 200, body
        funded = 1_000_000
        tenant = admin.tenant(funded=funded)
        peer = await Peer.open(server)
        try:
            await peer.start({"api_key": tenant.key})
            await peer.dtmf("12#")
            assert abs(await peer.reply() - 15 * MS_PER_CHAR * 8) <= 16
            assert await peer.stop() == 1000
        finally:
            await peer.close()
        ended = await log_line(server, "call ended", call_id=peer.call_sid)
        audio_ms = ended["asr_audio_ms"]
        assert audio_ms == peer.frames_sent * 20 and ended["tts_characters"] == 15
        expected = -(-audio_ms * 1000 // 60_000) + -(-15 * 2000 // 1000)  # ceil, per meter
        assert ended["asr_cost_micros"] + ended["tts_cost_micros"] == expected
        pg = await assert_books_balance(dsn, rurl, tenant.tenant_id, expected_usage=expected)
        assert pg.balance == funded - expected
        sid = ended["session_id"]
        assert {e.split(":")[0] for e in pg.events_by_id} == {sid, f"{sid}-tts"}
    finally:
        code = server.stop()
        await cleanup_redis(rurl, admin.tenants, admin.key_ids)
        await drop_database(database_url, name)
    assert code == 0, "\n".join(server.stderr_lines[-30:])
