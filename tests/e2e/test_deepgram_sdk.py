"""Deepgram's live STT (`/v1/listen`) and streaming TTS (`/v1/speak`) against a real server,
with the official `deepgram-sdk` (7.x) as the client: what it sends and parses is the contract
(docs/compat.md, "Deepgram")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.speak.v1.types.speak_v1text import SpeakV1Text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server.flow_control.text_backlog import READ_SLACK_CHARS
from tests.e2e.conftest import TEST_KEY, ServerProcess, wait_for
from tests.e2e.test_billing_e2e import Billing, assert_books_balance, billing_server
from tests.e2e.test_tts_billing import charged_units
from tests.speech import espeak_pcm16, silence

# A Redis logical database no other server-starting module uses (tests/unit's idempotency
# store test keeps no tenants there, so reconcile sees only ours).
REDIS_DB = 13
PRICE_PER_MIN = 1000  # [asr.models.synthetic] price_micros_per_minute in config/default.toml
CHUNK = 3200  # 100 ms of 16 kHz linear16


def client(server: ServerProcess, key: str = TEST_KEY) -> AsyncDeepgramClient:
    env = DeepgramClientEnvironment(base=server.http, production=server.ws, agent=server.ws,
                                    agent_rest=server.http)
    return AsyncDeepgramClient(api_key=key, environment=env)


def kind(msg: object) -> str:
    return "audio" if isinstance(msg, bytes) else str(getattr(msg, "type", "?"))


async def send_paced(conn: Any, audio: bytes, pace_s: float = 0.01) -> None:
    """Audio in 100 ms chunks, faster than real time but paced so the engine's interim
    results have time to come back between them."""
    for i in range(0, len(audio), CHUNK):
        await conn.send_media(audio[i:i + CHUNK])
        await asyncio.sleep(pace_s)


class Inbox:
    """What the SDK's socket yields (parsed messages and audio), as it comes."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self._new = asyncio.Event()

    async def collect(self, conn: Any) -> None:
        async for msg in conn:
            self.seen.append(msg)
            self._new.set()

    async def wait_until(self, predicate: Callable[[list[Any]], bool],
                         timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.seen):
                self._new.clear()
                await self._new.wait()


async def read_to_close(ws: ClientConnection, timeout: float = 10.0) -> list[Any]:
    seen: list[Any] = []
    async with asyncio.timeout(timeout):
        try:
            async for msg in ws:
                seen.append(json.loads(msg))
        except ConnectionClosed:
            pass
    return seen


# --- /v1/listen -----------------------------------------------------------------------------


async def test_live_transcription_with_interims_finals_finalize_and_close(
        server: ServerProcess) -> None:
    first = silence(300) + espeak_pcm16("hello world, this is a streaming test") + silence(900)
    second = silence(300) + espeak_pcm16("finalize me now")  # no pause after it
    inbox = Inbox()
    seen = inbox.seen
    async with client(server).listen.v1.connect(
            model="synthetic", language="en-US", encoding="linear16", sample_rate=16000,
            channels=1, interim_results=True, endpointing=300, utterance_end_ms=1000,
            vad_events=True, punctuate=True, smart_format=True) as conn:
        reader = asyncio.create_task(inbox.collect(conn))
        await send_paced(conn, first)
        await inbox.wait_until(lambda s: any(kind(m) == "UtteranceEnd" for m in s))
        await conn.send_keep_alive()
        # Nothing is open: answered all the same (Pipecat waits for it), with an empty final.
        await conn.send_finalize()
        await inbox.wait_until(lambda s: any(getattr(m, "from_finalize", False) for m in s))
        await send_paced(conn, second)
        await conn.send_finalize()
        await inbox.wait_until(
            lambda s: sum(bool(getattr(m, "from_finalize", False)) for m in s) == 2)
        await conn.send_close_stream()
        await asyncio.wait_for(reader, 10)
    kinds = [kind(m) for m in seen]
    assert kinds.count("SpeechStarted") == 2
    results = [m for m in seen if kind(m) == "Results"]
    interims = [r for r in results if not r.is_final]
    finals = [r for r in results if r.is_final]
    assert interims, kinds
    assert len(finals) == 3, kinds
    by_endpointing, empty, by_finalize = finals
    assert empty.from_finalize and not empty.speech_final
    assert empty.channel.alternatives[0].transcript == ""
    assert all(r.channel.alternatives[0].transcript for r in (by_endpointing, by_finalize))
    assert by_endpointing.speech_final and not by_endpointing.from_finalize
    assert by_finalize.from_finalize and not by_finalize.speech_final
    for r in results:
        assert r.channel_index == [0, 1] and r.metadata.request_id
        alt = r.channel.alternatives[0]
        assert r.start >= 0 and r.duration >= 0 and 0 <= alt.confidence <= 1
        assert all(r.start <= w.start <= w.end for w in alt.words), r
    # An interim never claims more than its final: both start where the utterance did.
    assert all(i.start in (by_endpointing.start, by_finalize.start) for i in interims)
    end = next(m for m in seen if kind(m) == "UtteranceEnd")
    assert end.channel == [0, 1]
    assert end.last_word_end == by_endpointing.channel.alternatives[0].words[-1].end
    assert kinds.index("UtteranceEnd") > results.index(by_endpointing)
    # CloseStream: the last final, then Metadata with the audio's duration, then close 1000.
    assert kinds[-1] == "Metadata"
    assert seen[-1].duration == (len(first) + len(second)) // 32 / 1000  # whole ms
    assert seen[-1].channels == 1 and len(seen[-1].sha256) == 64


async def test_no_vad_events_and_no_utterance_end_unless_asked(server: ServerProcess) -> None:
    audio = silence(300) + espeak_pcm16("just the results please") + silence(900)
    inbox = Inbox()
    seen = inbox.seen
    async with client(server).listen.v1.connect(
            model="nova-3", encoding="linear16", sample_rate=16000) as conn:
        reader = asyncio.create_task(inbox.collect(conn))
        await send_paced(conn, audio, pace_s=0)
        await conn.send_close_stream()
        await asyncio.wait_for(reader, 10)
    kinds = [kind(m) for m in seen]
    # Deepgram's defaults: no interim results, no SpeechStarted, no UtteranceEnd; a Deepgram
    # model name we do not serve runs on the default model.
    assert set(kinds) == {"Results", "Metadata"}, kinds
    assert all(m.is_final for m in seen if kind(m) == "Results")
    assert seen[0].metadata.model_info.name == "synthetic"


async def test_refusals_raise_the_sdks_errors(server: ServerProcess) -> None:
    with pytest.raises(ApiError) as bad_key:
        async with client(server, key="not-a-key").listen.v1.connect(
                model="synthetic", encoding="linear16", sample_rate=16000):
            pass
    assert bad_key.value.status_code == 401
    for params in ({"channels": 2}, {"encoding": "opus"}, {"multichannel": True},
                   {"redact": "pci"}):
        with pytest.raises(ApiError) as refused:
            async with client(server).listen.v1.connect(
                    model="synthetic", **{"encoding": "linear16", "sample_rate": 16000,
                                          **params}):
                pass
        assert refused.value.status_code == 400, params


async def test_token_subprotocol_and_deepgram_closes(server: ServerProcess) -> None:
    """Browsers pass the key as `Sec-WebSocket-Protocol: token, <key>`. A WAV file streamed as
    raw samples is audio we cannot decode: Deepgram's 1008 DATA-0000, with its Error first."""
    url = f"{server.ws}/v1/listen?model=synthetic&encoding=linear16&sample_rate=16000"
    async with connect(url, subprotocols=["token", TEST_KEY]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "token"
        await ws.send(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 3200)
        seen = await read_to_close(ws)
        assert ws.close_code == 1008 and ws.close_reason == "DATA-0000"
    assert seen[-1]["type"] == "Error" and seen[-1]["variant"] == "bad_audio"
    async with connect(url, additional_headers={"Authorization": f"Token {TEST_KEY}"}) as ws:
        await ws.send('{"type": "Nonsense"}')
        answer = json.loads(await ws.recv())
        assert answer["type"] == "Error" and answer["variant"] == "SchemaError"
        await ws.send('{"type": "Configure", "keyterms": ["streamgate"]}')
        answer = json.loads(await ws.recv())
        assert answer["type"] == "ConfigureFailure"
        assert answer["code"] == "CONFIGURE_KEYTERMS_NOT_SUPPORTED"
        # No audio and no KeepAlive within the idle timeout: Deepgram's NET-0001.
        assert [m["variant"] for m in await read_to_close(ws)] == ["idle_timeout"]
        assert ws.close_code == 1011 and ws.close_reason == "NET-0001"


# --- /v1/speak ------------------------------------------------------------------------------


async def test_speak_stream_with_flush_clear_and_close(server: ServerProcess) -> None:
    inbox = Inbox()
    seen = inbox.seen
    async with client(server).speak.v1.connect(
            model="aura-2-thalia-en", encoding="linear16", sample_rate=16000) as conn:
        reader = asyncio.create_task(inbox.collect(conn))
        await conn.send_text(SpeakV1Text(text="Hello from the gateway. "))
        await conn.send_text(SpeakV1Text(text="This sentence is spoken too"))
        await conn.send_flush()
        await inbox.wait_until(lambda s: any(kind(m) == "Flushed" for m in s), 20)
        flushed_at = next(i for i, m in enumerate(seen) if kind(m) == "Flushed")
        audio = b"".join(m for m in seen[:flushed_at] if isinstance(m, bytes))
        # espeak-ng at 175 wpm: well over a second of 16 kHz linear16 for these words.
        assert len(audio) > 32000 and len(audio) % 2 == 0
        assert seen[flushed_at].sequence_id == 0
        await conn.send_text(SpeakV1Text(text="A long text that is cleared before it is all "
                                              "spoken, word after word after word. " * 5))
        await conn.send_clear()
        await inbox.wait_until(lambda s: any(kind(m) == "Cleared" for m in s), 20)
        await conn.send_text(SpeakV1Text(text="And the last words."))
        await conn.send_flush()
        await inbox.wait_until(lambda s: [kind(m) for m in s].count("Flushed") == 2, 20)
        await conn.send_close()
        await asyncio.wait_for(reader, 20)
    kinds = [kind(m) for m in seen]
    # The model asked for is Deepgram's: said so once, then spoken with ours.
    assert kinds[:2] == ["Metadata", "Warning"], kinds[:4]
    assert seen[0].model_name == "espeak-en" and seen[1].code == "model_not_served"
    cleared = next(m for m in seen if kind(m) == "Cleared")
    flushes = [m.sequence_id for m in seen if kind(m) == "Flushed"]
    assert cleared.sequence_id == 0 and flushes == [0, 1]
    assert kinds[-1] == "Flushed" or kinds[-1] == "audio"


async def test_speak_refusals(server: ServerProcess) -> None:
    with pytest.raises(ApiError) as bad_key:
        async with client(server, key="nope").speak.v1.connect(model="espeak-en"):
            pass
    assert bad_key.value.status_code == 401
    with pytest.raises(ApiError) as mp3:
        async with client(server).speak.v1.connect(model="espeak-en", encoding="mp3"):
            pass
    assert mp3.value.status_code == 400


# --- billing --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def billed(redis_url: str, database_url: str) -> Iterator[Billing]:
    with billing_server(redis_url, database_url, REDIS_DB) as env:
        yield env


async def charged_audio_ms(dsn: str, tenant_id: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        units = await conn.fetchval(
            "SELECT coalesce(sum(units), 0) FROM usage_events"
            " WHERE tenant_id = $1 AND unit = 'audio_ms'", tenant_id)
    finally:
        await conn.close()
    return int(units)


async def test_listen_and_speak_are_charged_what_they_used(billed: Billing) -> None:
    tenant = billed.admin.tenant(funded=1_000_000)
    audio = silence(300) + espeak_pcm16("charge me for this") + silence(700)
    audio_ms = len(audio) // 32
    inbox = Inbox()
    seen = inbox.seen
    async with client(billed.server, key=tenant.key).listen.v1.connect(
            model="synthetic", encoding="linear16", sample_rate=16000) as conn:
        reader = asyncio.create_task(inbox.collect(conn))
        await send_paced(conn, audio, pace_s=0)
        await conn.send_close_stream()
        await asyncio.wait_for(reader, 15)
    assert kind(seen[-1]) == "Metadata" and seen[-1].duration == audio_ms / 1000
    cost = -(-audio_ms * PRICE_PER_MIN // 60_000)
    await assert_books_balance(billed.dsn, billed.redis_url, tenant.tenant_id,
                               expected_usage=cost)
    assert await charged_audio_ms(billed.dsn, tenant.tenant_id) == audio_ms
    spoken_inbox = Inbox()
    spoken = spoken_inbox.seen
    async with client(billed.server, key=tenant.key).speak.v1.connect(
            model="espeak-en", encoding="linear16", sample_rate=16000) as conn:
        reader = asyncio.create_task(spoken_inbox.collect(conn))
        await conn.send_text(SpeakV1Text(text="Twenty six characters here"))
        await conn.send_close()
        await asyncio.wait_for(reader, 15)
    assert any(isinstance(m, bytes) for m in spoken)
    await assert_books_balance(billed.dsn, billed.redis_url, tenant.tenant_id)
    units, _ = await charged_units(billed.dsn, tenant.tenant_id)
    assert units == len("Twenty six characters here")
    # A wallet that cannot pay: refused at the upgrade (402), nothing charged.
    broke = billed.admin.tenant(funded=0)
    with pytest.raises(ApiError) as no_money:
        async with client(billed.server, key=broke.key).listen.v1.connect(
                model="synthetic", encoding="linear16", sample_rate=16000):
            pass
    assert no_money.value.status_code == 402


# --- back pressure --------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _flood(server: ServerProcess, seconds: int) -> Any:
    """A Deepgram client knows no credit: it sends audio as fast as the socket takes it. The
    engine is slow (synthetic-slow), so the server must push back through TCP."""
    speech = espeak_pcm16("one two three four five six seven eight nine ten") + silence(400)
    audio = (speech * (seconds * 32000 // len(speech) + 1))[:seconds * 32000]
    inbox = Inbox()
    async with client(server).listen.v1.connect(
            model="synthetic-slow", encoding="linear16", sample_rate=16000) as conn:
        reader = asyncio.create_task(inbox.collect(conn))
        for i in range(0, len(audio), CHUNK):
            await conn.send_media(audio[i:i + CHUNK])
        await conn.send_close_stream()
        await asyncio.wait_for(reader, 60)
    metadata = inbox.seen[-1]
    assert kind(metadata) == "Metadata"
    return metadata


async def test_flooding_clients_keep_server_memory_bounded(server: ServerProcess) -> None:
    """Eight clients push 60 s of audio each at once with no pacing: the session's ingest bound
    pauses reading their sockets, nothing is dropped (overflow=block), and the server's memory
    grows by far less than what they pushed (8 x 1.9 MB), as for our own protocol
    (tests/e2e/test_asr_stream.py)."""
    await _flood(server, 2)  # warm up allocators and engine paths first
    before = _rss_kib(server.proc.pid)
    results = await asyncio.gather(*[_flood(server, 60) for _ in range(8)])
    after = _rss_kib(server.proc.pid)
    assert all(r.duration == 60.0 for r in results)
    assert after - before < 12 * 1024, f"RSS grew {after - before} KiB"


def tts_ends(server: ServerProcess) -> list[dict[str, Any]]:
    return [e for e in server.logs()
            if e.get("logger") == "streamgate.tts" and e.get("msg") == "session ended"]


async def test_a_speak_client_that_never_reads_is_held_back(server: ServerProcess) -> None:
    """Speak clients that send text without end and never read (a small receive buffer, so
    the server's writes back up soon): the audio waits within the session's credit window and
    backlog (no grants: the socket took nothing), the text they push waits in their own sockets
    (reading paused), the server's memory stays bounded, and after `server.idle_timeout_s`
    (1.5 s here) of taking nothing they are closed 1008 `client_not_reading`."""
    speak = json.dumps({"type": "Speak", "text": "Back pressure holds this text. " * 13})
    url = f"{server.ws}/v1/speak?model=synthetic&encoding=linear16&sample_rate=48000"

    async def push() -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.ws_port))
        sent = 0
        with contextlib.suppress(ConnectionClosed):
            async with connect(url, sock=sock, max_queue=1, additional_headers={
                    "Authorization": f"Token {TEST_KEY}"}) as ws:
                async with asyncio.timeout(20):
                    while True:  # until the server cuts it off
                        await ws.send(speak)
                        sent += len(speak)
        return sent

    ended = len(tts_ends(server))
    before = _rss_kib(server.proc.pid)
    pushed = await asyncio.gather(push(), push())
    after = _rss_kib(server.proc.pid)
    assert min(pushed) > 1_000_000  # each pushed megabytes of text (into socket buffers)
    assert after - before < 12 * 1024, f"RSS grew {after - before} KiB"
    # Each session's one end line, written once it settled.
    await asyncio.to_thread(wait_for, lambda: len(tts_ends(server)) >= ended + 2, 10)
    for end in tts_ends(server)[ended:]:
        # What the server took in: the text backlog's bound, not what the clients pushed.
        assert end["text_backlog_peak"] <= 20000 + READ_SLACK_CHARS, end
        assert end["close_code"] == 1008, end
