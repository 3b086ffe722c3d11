"""The client SDK's live streams (client/streamgate_client/streams.py) against a real server:
audio sent as it is captured never exceeds the server's credit, every event comes back typed,
TTS audio taken from the stream is credited back, and a barge-in clears."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
import wave
from pathlib import Path

import pytest

from streamgate_client.streams import AsrStream, TtsStream
from streamgate_protocol import messages as m
from tests.e2e.conftest import TEST_KEY, ServerProcess, espeak_pcm16, silence

pytestmark = pytest.mark.e2e


async def test_an_asr_stream_sends_within_its_credit_and_gets_typed_events(
        server: ServerProcess) -> None:
    audio = silence(300) + espeak_pcm16("hello from the software development kit") + silence(900)
    async with await AsrStream.connect(f"{server.ws}/v1/asr/stream", key=TEST_KEY,
                                       params={"model": "synthetic"}) as asr:
        assert asr.ready is not None and asr.ready.resume_token
        for i in range(0, len(audio), 640):  # 20 ms frames, as fast as credit allows
            await asr.send(audio[i:i + 640])
        await asr.close()
        events = [event async for event in asr]
    assert asr.close_code == 1000
    warnings = [e for e in events if isinstance(e, m.Warning)]
    assert not [w for w in warnings if w.code == "credit_exceeded"], warnings
    finals = [e for e in events if isinstance(e, m.Transcript) and e.is_final]
    assert len(finals) == 1 and finals[0].text
    summary = events[-1]
    assert isinstance(summary, m.Summary) and summary.audio_ms == len(audio) // 32


async def test_a_tts_stream_speaks_text_as_it_comes_and_credits_what_was_taken(
        server: ServerProcess) -> None:
    async with await TtsStream.connect(f"{server.ws}/v1/tts/stream", key=TEST_KEY,
                                       model="synthetic") as tts:
        for token in ["Hello ", "there, ", "this is ", "streamed. ", "And a second ", "one."]:
            await tts.send_text(token)
        await tts.flush()
        await tts.close()
        audio = bytearray()
        events: list[object] = []
        async for item in tts:
            if isinstance(item, bytes):
                audio += item
            else:
                events.append(item)
    assert tts.close_code == 1000
    done = [e for e in events if isinstance(e, m.AudioDone)]
    assert " ".join(d.text for d in done) == "Hello there, this is streamed. And a second one."
    assert any(isinstance(e, m.Flushed) for e in events)
    summary = events[-1]
    assert isinstance(summary, m.TtsSummary) and summary.chunks == len(done)
    # Every frame was credited as it was taken: the whole text was spoken, far beyond the
    # first credit window.
    assert tts.ready is not None and len(audio) > tts.ready.credit_bytes


async def test_a_tts_stream_can_barge_in(server: ServerProcess) -> None:
    async with await TtsStream.connect(f"{server.ws}/v1/tts/stream", key=TEST_KEY,
                                       model="synthetic") as tts:
        await tts.send_text("A long answer that the caller interrupts. " * 20)
        await tts.flush()
        cleared = None
        async for item in tts:
            if isinstance(item, bytes) and cleared is None:
                await tts.clear()
                cleared = False
            elif isinstance(item, m.Cleared):
                cleared = True
                await tts.close()
        assert cleared is True
    assert tts.close_code == 1000


def test_the_tts_cli_speaks_through_the_sdk(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "speech.wav"
    done = subprocess.run(
        [sys.executable, "-m", "server", "tts", "Hello there. This is the command line.",
         "--url", f"{server.ws}/v1/tts/stream", "--key", TEST_KEY, "--model", "synthetic",
         "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "characters" in done.stdout
    with wave.open(str(out)) as wav:
        assert wav.getnframes() > 0 and wav.getframerate() == 16000


async def test_turn_latencies_in_band_on_request_and_in_the_metrics(
        server: ServerProcess) -> None:
    """`metrics=true` brings a `metrics` message after each final; /metrics has the histograms
    an SLO is written on (end of speech -> final; TTS first audio) either way."""
    audio = silence(300) + espeak_pcm16("how long did that take") + silence(900)
    async with await AsrStream.connect(f"{server.ws}/v1/asr/stream", key=TEST_KEY,
                                       params={"model": "synthetic", "metrics": "true"}) as asr:
        await asr.send(audio)
        await asr.close()
        events = [event async for event in asr]
    [final] = [e for e in events if isinstance(e, m.Transcript) and e.is_final]
    [turn] = [e for e in events if isinstance(e, m.UtteranceMetrics)]
    assert turn.utterance_id == final.utterance_id
    assert 0 < turn.engine_ms and 0 <= turn.end_of_speech_to_final_ms < 10_000
    async with await TtsStream.connect(f"{server.ws}/v1/tts/stream", key=TEST_KEY,
                                       model="synthetic") as tts:
        await tts.send_text("Timed.")
        await tts.close()
        _ = [item async for item in tts]
    page = await asyncio.to_thread(scrape, server)
    for name in ("streamgate_asr_final_latency_seconds_count",
                 "streamgate_tts_first_audio_seconds_count"):
        counts = [float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                  if line.startswith(name + '{model="synthetic"}')]
        assert counts and counts[0] >= 1, name


def scrape(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=10) as resp:
        return str(resp.read().decode())
