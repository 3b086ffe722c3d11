"""Make the golden sessions of tests/e2e/test_golden_replay.py: run each session below with
`record=true` against a real server (tests/e2e/server.toml, as the tests replay them) and keep
what the server recorded.

    .venv/bin/python -m tests.golden.make_golden

The inputs are fixed (espeak-ng speech of fixed text, fixed pauses, fixed text pieces), so
running it again makes the same sessions; only times and ids in the files change. Run it when
a change of behaviour is intended, and say in the commit what changed in the diff.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect

from streamgate_client.asr_client import stream_audio
from streamgate_protocol.audio import pcm16_to_ulaw
from streamgate_protocol.recording import read_recording
from tests.e2e.conftest import TEST_KEY, start_server
from tests.speech import espeak_pcm16, silence

HERE = Path(__file__).resolve().parent


def two_phrases(rate: int) -> bytes:
    """Two phrases 800 ms apart: two utterances at the default endpointing (500 ms), one at
    endpointing_ms=1000 (what test_golden_replay's changed-setting test relies on)."""
    return (silence(300, rate) + espeak_pcm16("hello world", rate) + silence(800, rate)
            + espeak_pcm16("testing one two three", rate) + silence(700, rate))


async def asr_synthetic_mulaw(ws_url: str) -> None:
    """The synthetic engine (its words follow from the audio's length: exact on any
    machine), telephony audio: G.711 mu-law at 8 kHz."""
    audio = pcm16_to_ulaw(np.frombuffer(two_phrases(8000), dtype=np.int16))
    await stream_audio(f"{ws_url}/v1/asr/stream", audio, encoding="mulaw", sample_rate=8000,
                       key=TEST_KEY, realtime=True,
                       extra_params={"model": "synthetic", "record": "true"})


async def asr_sphinx_pcm(ws_url: str) -> None:
    """Embedded pocketsphinx on 16-bit PCM at 8 kHz (resampled to its 16 kHz)."""
    await stream_audio(f"{ws_url}/v1/asr/stream", two_phrases(8000), encoding="pcm_s16le",
                       sample_rate=8000, key=TEST_KEY, realtime=True,
                       extra_params={"model": "sphinx-en", "record": "true"})


TTS_PIECES = ("Hello there. ", "This is a ", "recorded ", "session, spoken ", "in pieces.")


async def tts_synthetic(ws_url: str) -> None:
    """Streaming TTS on the synthetic engine: text in pieces as an LLM streams it, a flush,
    credit granted back as audio is taken, then close."""
    url = f"{ws_url}/v1/tts/stream?model=synthetic&sample_rate=16000&record=true"
    async with connect(url, additional_headers={"Authorization": f"Bearer {TEST_KEY}"}) as ws:
        await ws.recv()  # ready
        for piece in TTS_PIECES:
            await ws.send(json.dumps({"type": "text", "text": piece}))
            await asyncio.sleep(0.05)
        await ws.send(json.dumps({"type": "flush"}))
        async for message in ws:
            if isinstance(message, bytes):
                await ws.send(json.dumps({"type": "credit", "bytes": len(message)}))
            elif json.loads(message).get("type") == "flushed":
                await ws.send(json.dumps({"type": "close"}))


SESSIONS: dict[str, Callable[[str], Awaitable[None]]] = {
    "asr_synthetic_mulaw": asr_synthetic_mulaw,
    "asr_sphinx_pcm": asr_sphinx_pcm,
    "tts_synthetic": tts_synthetic,
}


def finished_recording(directory: Path, known: set[Path], timeout_s: float = 10.0) -> Path:
    """The one new recording in `directory`, once its server has written its end."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = [p for p in directory.rglob("*.jsonl") if p not in known]
        if len(new) == 1 and read_recording(new[0]).complete:
            return new[0]
        time.sleep(0.05)
    raise RuntimeError(f"no finished recording in {directory}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        server = start_server({"STREAMGATE_RECORDING__ENABLED": "true",
                               "STREAMGATE_RECORDING__DIRECTORY": str(directory)})
        try:
            known: set[Path] = set()
            for name, session in SESSIONS.items():
                asyncio.run(session(server.ws))
                made = finished_recording(directory, known)
                known.add(made)
                target = HERE / f"{name}.jsonl"
                shutil.copyfile(made, target)
                print(f"{target.relative_to(HERE.parent.parent)}: {target.stat().st_size} bytes")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
