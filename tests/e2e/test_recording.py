"""Session recording against a real server (docs/recording.md): `record=true` keeps the audio
the client sent and every message the server sent, in order, with times; a recording that
reaches recording.max_bytes stops, the session does not; a server with recording off refuses
`record=true` before anything is admitted."""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect

from streamgate_client.asr_client import Rejected, stream_audio
from streamgate_client.replay import ReplayOptions, compare, replay
from streamgate_protocol import recording as fmt
from streamgate_protocol.audio import pcm16_to_ulaw
from streamgate_protocol.messages import Summary, Transcript
from tests.e2e.conftest import TEST_KEY, ServerProcess, espeak_pcm16, silence, start_server

pytestmark = pytest.mark.e2e

MAX_BYTES = 24576


@pytest.fixture(scope="module")
def recording_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("recordings")


@pytest.fixture(scope="module")
def recording_server(recording_dir: Path) -> Iterator[ServerProcess]:
    srv = start_server({"STREAMGATE_RECORDING__ENABLED": "true",
                        "STREAMGATE_RECORDING__DIRECTORY": str(recording_dir),
                        "STREAMGATE_RECORDING__MAX_BYTES": str(MAX_BYTES)})
    yield srv
    assert srv.stop() == 0, "\n".join(srv.stderr_lines[-30:])


def mulaw(pcm: bytes) -> bytes:
    return pcm16_to_ulaw(np.frombuffer(pcm, dtype=np.int16))


def new_recording(directory: Path, known: set[Path]) -> fmt.Recording:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for path in directory.rglob("*.jsonl"):
            if path not in known:
                recording = fmt.read_recording(path)
                if recording.complete:
                    known.add(path)
                    return recording
        time.sleep(0.05)
    raise AssertionError("no finished recording")


def test_a_recording_holds_what_crossed_the_wire(recording_server: ServerProcess,
                                                  recording_dir: Path) -> None:
    known = set(recording_dir.rglob("*.jsonl"))
    audio = mulaw(silence(200, 8000) + espeak_pcm16("yes", 8000) + silence(600, 8000))
    events = asyncio.run(stream_audio(
        f"{recording_server.ws}/v1/asr/stream", audio, encoding="mulaw", sample_rate=8000,
        key=TEST_KEY, realtime=False, extra_params={"record": "true", "model": "synthetic"}))
    recording = new_recording(recording_dir, known)
    header = recording.header
    assert (header.kind, header.path, header.tenant_id) == ("asr", "/v1/asr/stream", "static")
    assert header.query["encoding"] == "mulaw" and "api_key" not in header.query
    sent = b"".join(e.data for e in recording.events if isinstance(e, fmt.InBinary))
    assert sent == audio
    texts = [json.loads(e.text) for e in recording.events if isinstance(e, fmt.InText)]
    assert texts == [{"type": "close"}]
    out = [json.loads(bytes(e.msg)) for e in recording.events if isinstance(e, fmt.OutText)]
    assert len(out) == len(events)  # every message the client received, nothing else
    assert out[0]["type"] == "ready" and out[-1]["type"] == "summary"
    finals = [e.text for e in events if isinstance(e, Transcript) and e.is_final]
    assert finals and finals == [m["text"] for m in out
                                 if m["type"] == "transcript" and m["is_final"]]
    times = [e.t_ms for e in recording.events if not isinstance(e, fmt.End)]
    assert times == sorted(times) and times[0] >= 0
    close = [e for e in recording.events if isinstance(e, fmt.CloseSent)]
    assert [c.code for c in close] == [1000]
    end = recording.events[-1]
    assert isinstance(end, fmt.End) and not end.truncated


def test_a_full_recording_stops_recording_not_the_session(recording_server: ServerProcess,
                                                          recording_dir: Path) -> None:
    known = set(recording_dir.rglob("*.jsonl"))
    speech = espeak_pcm16("this session is longer than its recording may be", 8000)
    audio = mulaw(silence(200, 8000) + speech + silence(600, 8000))
    assert len(audio) > MAX_BYTES
    events = asyncio.run(stream_audio(
        f"{recording_server.ws}/v1/asr/stream", audio, encoding="mulaw", sample_rate=8000,
        key=TEST_KEY, realtime=False, extra_params={"record": "true", "model": "synthetic"}))
    summary = events[-1]
    assert isinstance(summary, Summary)
    assert summary.audio_ms == len(audio) // 8
    recording = new_recording(recording_dir, known)
    kinds = [type(e) for e in recording.events]
    assert kinds[-3:] == [fmt.Truncated, fmt.Closed, fmt.End]
    end = recording.events[-1]
    assert isinstance(end, fmt.End) and end.truncated
    path = next(p for p in recording_dir.rglob("*.jsonl") if p in known
                and fmt.read_recording(p).header.recording_id
                == recording.header.recording_id)
    assert path.stat().st_size <= MAX_BYTES


def test_record_true_is_refused_where_recording_is_off(server: ServerProcess) -> None:
    with pytest.raises(Rejected) as refused:
        asyncio.run(stream_audio(
            f"{server.ws}/v1/asr/stream", silence(100), encoding="pcm_s16le",
            sample_rate=16000, key=TEST_KEY, realtime=False, extra_params={"record": "true"}))
    assert refused.value.status == 400
    assert refused.value.code == "bad_request"
    assert "recording is not enabled" in refused.value.message


def test_a_bad_record_value_is_refused(recording_server: ServerProcess) -> None:
    with pytest.raises(Rejected) as refused:
        asyncio.run(stream_audio(
            f"{recording_server.ws}/v1/asr/stream", silence(100), encoding="pcm_s16le",
            sample_rate=16000, key=TEST_KEY, realtime=False, extra_params={"record": "maybe"}))
    assert refused.value.status == 400
    assert "record must be true or false" in refused.value.message


async def speak(url: str, pieces: list[str]) -> list[bytes | str]:
    """A TTS client: text in pieces, flush, credit back for the audio taken, close."""
    got: list[bytes | str] = []
    async with connect(url, additional_headers={"Authorization": f"Bearer {TEST_KEY}"}) as ws:
        for piece in pieces:
            await ws.send(json.dumps({"type": "text", "text": piece}))
        await ws.send(json.dumps({"type": "flush"}))
        async for message in ws:
            got.append(message)
            if isinstance(message, bytes):
                await ws.send(json.dumps({"type": "credit", "bytes": len(message)}))
            elif json.loads(message)["type"] == "flushed":
                await ws.send(json.dumps({"type": "close"}))
    return got


def test_a_tts_session_recorded_now_replays_the_same(recording_server: ServerProcess,
                                                     recording_dir: Path) -> None:
    known = set(recording_dir.rglob("*.jsonl"))
    got = asyncio.run(speak(
        f"{recording_server.ws}/v1/tts/stream?model=synthetic&record=true",
        ["One sentence. ", "And another ", "one."]))
    recording = new_recording(recording_dir, known)
    assert recording.header.kind == "tts"
    audio = [m for m in got if isinstance(m, bytes)]
    recorded_audio = [e for e in recording.events if isinstance(e, fmt.OutBinary)]
    assert [e.size for e in recorded_audio] == [len(a) for a in audio]
    assert [e.crc32 for e in recorded_audio] == [zlib.crc32(a) for a in audio]
    replayed = asyncio.run(replay(recording, recording_server.ws,
                                  ReplayOptions(speed=8, key=TEST_KEY)))
    result = compare(recording, replayed)
    assert result.same, "\n".join(result.diff())
    assert any(line.startswith("session: audio ") for line in result.recorded)
