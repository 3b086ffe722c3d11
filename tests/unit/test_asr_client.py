"""The ASR client's credit discipline, pacing, error handling and CLI, against a fake server.

The fake stands for the real server: it speaks the wire protocol (ready with a credit window,
credit grants as it "drains" audio, summary and close 1000 after `close`) and records what the
client did, in particular whether it ever had more bytes in flight than it had been granted.
It runs on its own event loop in a thread so the synchronous CLI entry point can be tested too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamgate_client.asr_client import (
    AbnormalClose,
    AudioInputError,
    Rejected,
    add_arguments,
    load_audio,
    main,
    stream_audio,
)
from streamgate_protocol.messages import Credit, Error, Ready, Summary, Transcript


@dataclass
class SessionRecord:
    query: dict[str, str]
    headers: dict[str, str]
    frames: list[int] = field(default_factory=list)
    received: int = 0
    granted: int = 0
    buffered: int = 0
    closing: bool = False
    violations: list[tuple[int, int]] = field(default_factory=list)
    text: list[dict[str, Any]] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)


class FakeAsrServer:
    """Minimal protocol-conformant ASR endpoint on 127.0.0.1:<ephemeral port>."""

    def __init__(
        self,
        *,
        credit_bytes: int = 3200,
        drain_bytes_per_s: int = 320_000,
        reject: tuple[int, str, str] | None = None,
        abort_after_bytes: int | None = None,
    ) -> None:
        self.credit_bytes = credit_bytes
        self.drain_bytes_per_s = drain_bytes_per_s
        self.reject = reject
        self.abort_after_bytes = abort_after_bytes
        self.sessions: list[SessionRecord] = []
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> FakeAsrServer:
        self._thread.start()
        assert self._started.wait(10), "fake server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(
            self._handler, "127.0.0.1", 0, process_request=self._process_request
        ) as server:
            port = server.sockets[0].getsockname()[1]
            self.url = f"ws://127.0.0.1:{port}/v1/asr/stream"
            self._started.set()
            await self._stop.wait()

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if self.reject is None:
            return None
        status, code, message = self.reject
        body = json.dumps({"error": {"code": code, "message": message}})
        response = conn.respond(status, body)
        response.headers["Content-Type"] = "application/json"
        if status == 429:
            response.headers["Retry-After"] = "3"
        return response

    async def _send(self, ws: ServerConnection, msg: dict[str, Any]) -> None:
        await ws.send(json.dumps(msg))

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        rec = SessionRecord(
            query=dict(parse_qsl(urlsplit(ws.request.path).query)),
            headers={k.lower(): v for k, v in ws.request.headers.raw_items()},
            granted=self.credit_bytes,
        )
        self.sessions.append(rec)
        rate = int(rec.query.get("sample_rate", "16000"))
        await self._send(
            ws,
            {
                "type": "ready",
                "session_id": "s-1",
                "resume_token": "r-1",
                "audio": {"encoding": rec.query.get("encoding", "pcm_s16le"), "sample_rate": rate},
                "credit_bytes": self.credit_bytes,
                "limits": {
                    "max_frame_bytes": 65536,
                    "idle_timeout_s": 10.0,
                    "usage_interval_s": 5.0,
                    "max_utterance_ms": 30000,
                },
                "model": rec.query.get("model", "fake"),
            },
        )
        drainer = asyncio.create_task(self._drain(ws, rec))
        try:
            await self._serve_session(ws, rec, rate)
        finally:
            drainer.cancel()

    async def _drain(self, ws: ServerConnection, rec: SessionRecord) -> None:
        """Consume buffered audio at a fixed rate, independent of arrivals, like the pipeline
        does; grant credit for what has been consumed once a quarter of the window has."""
        tick_s = 0.002
        per_tick = max(1, int(self.drain_bytes_per_s * tick_s))
        consumed = 0
        while not rec.closing:
            await asyncio.sleep(tick_s)
            take = min(rec.buffered, per_tick)
            rec.buffered -= take
            consumed += take
            if consumed >= max(1, self.credit_bytes // 4) and not rec.closing:
                rec.granted += consumed
                try:
                    await self._send(ws, {"type": "credit", "bytes": consumed})
                except ConnectionClosed:
                    return
                consumed = 0

    async def _serve_session(self, ws: ServerConnection, rec: SessionRecord, rate: int) -> None:
        async for msg in ws:
            if isinstance(msg, bytes):
                rec.frames.append(len(msg))
                rec.audio += msg
                rec.received += len(msg)
                rec.buffered += len(msg)
                # Everything granted so far had been sent before this frame was read, so a
                # client that honours credit can never get ahead of it.
                if rec.received > rec.granted:
                    rec.violations.append((rec.received, rec.granted))
                if self.abort_after_bytes is not None and rec.received >= self.abort_after_bytes:
                    await self._send(
                        ws,
                        {
                            "type": "error",
                            "code": "insufficient_balance",
                            "message": "balance exhausted",
                            "retryable": False,
                        },
                    )
                    rec.closing = True
                    await ws.close(4002, "insufficient_balance")
                    return
                continue
            obj = json.loads(msg)
            rec.text.append(obj)
            if obj.get("type") == "close":
                rec.closing = True
                audio_ms = rec.received * 1000 // (2 * rate)
                await self._send(
                    ws,
                    {
                        "type": "transcript",
                        "utterance_id": 1,
                        "is_final": True,
                        "text": "hello world",
                        "start_ms": 0,
                        "end_ms": audio_ms,
                        "words": [],
                    },
                )
                await self._send(
                    ws,
                    {
                        "type": "summary",
                        "audio_ms": audio_ms,
                        "billed_ms": audio_ms,
                        "cost_micros": 12,
                        "utterances": 1,
                        "dropped_ms": 0,
                    },
                )
                await ws.close(1000, "")
                return


@pytest.fixture
def fake_server() -> Iterator[FakeAsrServer]:
    with FakeAsrServer() as server:
        yield server


def pcm_tone(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


async def test_never_exceeds_the_credit_window(fake_server: FakeAsrServer) -> None:
    audio = pcm_tone(2.0)  # 64000 bytes: twenty times the 3200-byte window
    events: list[object] = []
    messages = await stream_audio(
        fake_server.url,
        audio,
        encoding="pcm_s16le",
        sample_rate=16000,
        key="sk-test",
        realtime=False,
        chunk_ms=20,
        on_event=events.append,
        extra_params={"model": "fake", "interim_results": "true"},
    )
    (rec,) = fake_server.sessions
    assert rec.violations == []
    assert bytes(rec.audio) == audio
    assert max(rec.frames) <= 640  # 20 ms at 16 kHz, 16-bit
    assert rec.query == {
        "model": "fake",
        "interim_results": "true",
        "encoding": "pcm_s16le",
        "sample_rate": "16000",
    }
    assert rec.headers["authorization"] == "Bearer sk-test"
    assert rec.text == [{"type": "close"}]

    assert events == messages
    assert isinstance(messages[0], Ready)
    assert sum(isinstance(m, Credit) for m in messages) >= 10
    assert isinstance(messages[-2], Transcript) and messages[-2].text == "hello world"
    assert isinstance(messages[-1], Summary) and messages[-1].audio_ms == 2000


async def test_window_smaller_than_a_chunk_does_not_deadlock() -> None:
    audio = pcm_tone(0.25)  # 8000 bytes, sent through a 101-byte window
    with FakeAsrServer(credit_bytes=101) as server:
        await stream_audio(
            server.url, audio, encoding="pcm_s16le", sample_rate=16000, key=None, realtime=False
        )
    (rec,) = server.sessions
    assert rec.violations == []
    assert bytes(rec.audio) == audio
    assert all(n % 2 == 0 for n in rec.frames)  # never splits a 16-bit sample
    assert "authorization" not in rec.headers


async def test_realtime_paces_on_a_monotonic_schedule(fake_server: FakeAsrServer) -> None:
    audio = pcm_tone(0.6)
    started = time.monotonic()
    await stream_audio(
        fake_server.url, audio, encoding="pcm_s16le", sample_rate=16000, key=None, realtime=True
    )
    elapsed = time.monotonic() - started
    # The last 20 ms chunk is due at 0.58 s; accumulated sleeps would drift well past that.
    assert 0.55 <= elapsed < 1.5
    assert fake_server.sessions[0].violations == []


async def test_rejected_upgrade_carries_status_and_json_error() -> None:
    with FakeAsrServer(reject=(429, "rate_limited", "too many sessions")) as server:
        with pytest.raises(Rejected) as info:
            await stream_audio(
                server.url, b"\0" * 640, encoding="pcm_s16le", sample_rate=16000, key="k",
                realtime=False,
            )  # fmt: skip
    assert info.value.status == 429
    assert info.value.code == "rate_limited"
    assert info.value.message == "too many sessions"
    assert info.value.retry_after == "3"


async def test_abnormal_close_reports_code_and_reason() -> None:
    with FakeAsrServer(abort_after_bytes=1280) as server:
        with pytest.raises(AbnormalClose) as info:
            await stream_audio(
                server.url, pcm_tone(1.0), encoding="pcm_s16le", sample_rate=16000, key=None,
                realtime=False,
            )  # fmt: skip
    assert info.value.code == 4002
    assert info.value.reason == "insufficient_balance"
    assert any(
        isinstance(m, Error) and m.code == "insufficient_balance" for m in info.value.messages
    )


def write_wav(path: Path, seconds: float, rate: int, channels: int) -> None:
    mono = np.frombuffer(pcm_tone(seconds, rate), dtype="<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.repeat(mono, channels).astype("<i2").tobytes())


def parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_converts_wav_to_telephony_mulaw(
    tmp_path: Path, fake_server: FakeAsrServer, capsys: pytest.CaptureFixture[str]
) -> None:
    wav_path = tmp_path / "stereo.wav"
    write_wav(wav_path, 1.0, 16000, channels=2)
    args = parse_cli(
        [str(wav_path), "--url", fake_server.url, "--encoding", "mulaw", "--sample-rate", "8000",
         "--vad", "low", "--no-interim-results", "--json"]
    )  # fmt: skip
    assert main(args) == 0
    (rec,) = fake_server.sessions
    assert rec.query["encoding"] == "mulaw"
    assert rec.query["sample_rate"] == "8000"
    assert rec.query["vad"] == "low"
    assert rec.query["interim_results"] == "false"
    assert abs(rec.received - 8000) <= 16  # one second of 8 kHz, one byte per sample
    assert max(rec.frames) <= 160  # 20 ms of 8 kHz mu-law
    assert rec.violations == []
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["type"] == "ready"
    assert lines[-1]["type"] == "summary"


def test_cli_prints_finals_and_summary(
    tmp_path: Path,
    fake_server: FakeAsrServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMGATE_API_KEY", "sk-env")
    wav_path = tmp_path / "mono.wav"
    write_wav(wav_path, 0.5, 8000, channels=1)
    assert main(parse_cli([str(wav_path), "--url", fake_server.url])) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[0.00-0.50] hello world"
    assert out[1].startswith("summary: audio 0.50 s")
    (rec,) = fake_server.sessions
    assert rec.headers["authorization"] == "Bearer sk-env"
    assert rec.query["sample_rate"] == "8000"


def test_cli_rejection_exit_code_and_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wav_path = tmp_path / "mono.wav"
    write_wav(wav_path, 0.1, 16000, channels=1)
    with FakeAsrServer(reject=(401, "unauthorized", "missing or invalid API key")) as server:
        assert main(parse_cli([str(wav_path), "--url", server.url])) == 3
    err = capsys.readouterr().err
    assert "HTTP 401 unauthorized" in err
    assert "missing or invalid API key" in err


def test_cli_cannot_connect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wav_path = tmp_path / "mono.wav"
    write_wav(wav_path, 0.1, 16000, channels=1)
    # Port 9 (discard) on loopback: nothing listens there in a test environment.
    assert main(parse_cli([str(wav_path), "--url", "ws://127.0.0.1:9/v1/asr/stream"])) == 5
    assert "cannot connect" in capsys.readouterr().err


def test_raw_audio_needs_a_sample_rate(tmp_path: Path) -> None:
    raw = tmp_path / "audio.raw"
    raw.write_bytes(b"\0" * 320)
    with pytest.raises(AudioInputError, match="--sample-rate"):
        load_audio(raw)
    prepared = load_audio(raw, encoding="mulaw", sample_rate=8000)
    assert (prepared.encoding, prepared.sample_rate, prepared.duration_ms) == ("mulaw", 8000, 40)


def test_wave_format_extensible_falls_back_to_the_server_decoder(tmp_path: Path) -> None:
    # Python 3.11's wave module rejects WAVE_FORMAT_EXTENSIBLE; many tools write it.
    pcm = np.repeat(np.arange(1600, dtype="<i2"), 2).tobytes()  # stereo, 0.1 s at 16 kHz
    subformat_pcm = struct.pack("<H", 1) + bytes.fromhex("000000001000800000aa00389b71")
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 2, 16000, 64000, 4, 16, 22, 16, 3) + subformat_pcm
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(pcm)) + pcm
    path = tmp_path / "extensible.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    prepared = load_audio(path)
    assert (prepared.encoding, prepared.sample_rate, prepared.duration_ms) == (
        "pcm_s16le",
        16000,
        100,
    )
    assert np.array_equal(np.frombuffer(prepared.data, dtype="<i2"), np.arange(1600))
