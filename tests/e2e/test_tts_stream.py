"""End-to-end TTS over real sockets: text in pieces, audio paced by credit, flush, clear."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.e2e.conftest import TEST_KEY, ServerProcess
from tests.e2e.test_asr_stream import recv_until, stream_with_credit, url

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
TEXT = ("Streaming speech is made of many small pieces. Each one arrives as the model writes "
        "it, and the gateway speaks it as soon as a sentence is complete.")


def tts_url(server: ServerProcess, **params: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{server.ws}/v1/tts/stream" + (f"?{query}" if query else "")


async def collect(ws: ClientConnection, *, until: str, grant: bool, timeout: float = 30.0
                  ) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Read until a message of type `until`; grant credit for every audio frame if asked."""
    events: list[dict[str, Any]] = []
    audio: list[bytes] = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                audio.append(msg)
                if grant:
                    await ws.send(json.dumps({"type": "credit", "bytes": len(msg)}))
                continue
            event = json.loads(msg)
            events.append(event)
            if event["type"] == until:
                return events, audio


async def test_text_in_pieces_becomes_audio_of_matching_duration(server: ServerProcess) -> None:
    async with connect(tts_url(server, model="espeak-en", sample_rate=16000),
                       additional_headers=AUTH) as ws:
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready" and ready["audio"]["sample_rate"] == 16000
        assert ready["credit_bytes"] == 2000 * 32
        for i in range(0, len(TEXT), 7):  # token by token, as from an LLM
            await ws.send(json.dumps({"type": "text", "text": TEXT[i:i + 7]}))
        await ws.send(json.dumps({"type": "flush"}))
        events, audio = await collect(ws, until="flushed", grant=True)
        done = [e for e in events if e["type"] == "audio_done"]
        assert len(done) == 2  # two sentences, two chunks
        assert " ".join(d["text"] for d in done) == TEXT
        total_ms = sum(len(a) for a in audio) * 1000 // 32000
        assert abs(total_ms - sum(d["duration_ms"] for d in done)) <= 2 * len(done)
        # espeak speaks ~12-16 characters per second at its default rate.
        assert 40 <= total_ms / len(TEXT) <= 120, total_ms / len(TEXT)
        assert max(len(a) for a in audio) <= 100 * 32  # fixed-duration chunks (100 ms)
        await ws.send(json.dumps({"type": "close"}))
        rest, _ = await collect(ws, until="summary", grant=True)
        summary = rest[-1]
        # Billed characters are the ones synthesized (whitespace between chunks is not).
        assert summary["characters"] == sum(len(d["text"]) for d in done)
        assert summary["chunks"] == 2
        assert abs(summary["audio_ms"] - total_ms) <= 2
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1000


async def test_clear_stops_audio_within_one_chunk(server: ServerProcess) -> None:
    async with connect(tts_url(server, model="synthetic"), additional_headers=AUTH) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "text", "text": TEXT * 3}))
        await ws.send(json.dumps({"type": "flush"}))
        first = await asyncio.wait_for(ws.recv(), 10)
        assert isinstance(first, bytes)
        await ws.send(json.dumps({"type": "clear"}))
        after_clear: list[bytes] = []
        events, audio = await collect(ws, until="cleared", grant=False)
        after_clear += audio
        assert len(after_clear) <= 1 + 20  # only frames already on the wire before `clear`
        # Nothing more comes after `cleared`, even when credit is granted.
        await ws.send(json.dumps({"type": "credit", "bytes": 10_000_000}))
        with pytest.raises(TimeoutError):
            while True:
                msg = await asyncio.wait_for(ws.recv(), 1.0)
                assert not isinstance(msg, bytes), "audio after cleared"
        # The session goes on: new text is spoken.
        await ws.send(json.dumps({"type": "text", "text": "Still here."}))
        await ws.send(json.dumps({"type": "flush"}))
        events, audio = await collect(ws, until="flushed", grant=True)
        assert audio and any(e["type"] == "audio_done" for e in events)


async def test_client_without_credit_gets_at_most_its_window(server: ServerProcess) -> None:
    async with connect(tts_url(server, model="synthetic"), additional_headers=AUTH) as ws:
        ready = json.loads(await ws.recv())
        window = ready["credit_bytes"]
        await ws.send(json.dumps({"type": "text", "text": TEXT * 4}))
        await ws.send(json.dumps({"type": "flush"}))
        received = 0
        with pytest.raises(TimeoutError):
            while True:
                msg = await asyncio.wait_for(ws.recv(), 1.5)
                if isinstance(msg, bytes):
                    received += len(msg)
        assert 0 < received <= window
        # Granting credit lets the rest flow.
        await ws.send(json.dumps({"type": "credit", "bytes": 50_000_000}))
        _events, audio = await collect(ws, until="flushed", grant=False)
        assert sum(len(a) for a in audio) > 0


async def test_bad_tts_messages_are_errors(server: ServerProcess) -> None:
    async with connect(tts_url(server, model="synthetic"), additional_headers=AUTH) as ws:
        await ws.recv()
        await ws.send("{nope")
        assert (await recv_until(ws, "error"))["code"] == "bad_message"
        await ws.send(json.dumps({"type": "credit", "bytes": -5}))
        assert (await recv_until(ws, "error"))["code"] == "bad_message"
        await ws.send(b"\x00\x01")
        assert (await recv_until(ws, "error"))["code"] == "bad_message"
        await ws.send(json.dumps({"type": "close"}))
        events, _ = await collect(ws, until="summary", grant=True)
        assert events[-1]["characters"] == 0


async def test_tts_rejects_unknown_model(server: ServerProcess) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(tts_url(server, model="nope"), additional_headers=AUTH):
            pass
    assert info.value.response.status_code == 400


async def test_espeak_audio_back_through_asr_yields_a_transcript(server: ServerProcess) -> None:
    sentence = "Hello world. This is a test of speech recognition."
    async with connect(tts_url(server, model="espeak-en", sample_rate=16000),
                       additional_headers=AUTH) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "text", "text": sentence}))
        await ws.send(json.dumps({"type": "flush"}))
        _, audio = await collect(ws, until="flushed", grant=True)
    pcm = b"\x00\x00" * 8000 + b"".join(audio) + b"\x00\x00" * 16000
    async with connect(url(server, model="sphinx-en"), additional_headers=AUTH) as ws:
        ready = json.loads(await ws.recv())
        seen: list[dict[str, Any]] = []
        await stream_with_credit(ws, pcm, ready, seen)
        await ws.send(json.dumps({"type": "close"}))
        try:
            async with asyncio.timeout(30):
                async for msg in ws:
                    if isinstance(msg, str):
                        seen.append(json.loads(msg))
        except ConnectionClosed:
            pass
    finals = [m for m in seen if m["type"] == "transcript" and m["is_final"]]
    assert finals and any(f["text"].strip() for f in finals)


def test_tts_cli_writes_a_wav(server: ServerProcess, tmp_path: Any) -> None:
    import subprocess
    import sys
    import wave

    out = tmp_path / "hello.wav"
    done = subprocess.run(
        [sys.executable, "-m", "server", "tts", "Hello there. General greetings.", "--out",
         str(out), "--url", f"{server.ws}/v1/tts/stream", "--key", TEST_KEY,
         "--model", "espeak-en"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with wave.open(str(out)) as wav:
        assert wav.getframerate() == 16000
        assert wav.getnframes() > 16000  # more than a second of speech
    assert "wrote" in done.stdout
