# mypy: disallow-subclassing-any=False, disallow-untyped-decorators=False
"""The bench's peer: a Pipecat telephony server, the pipeline Pipecat's Twilio examples build.

Runs under the bench-only virtualenv (.venv-bench-pipecat, made by
loadtest/pipecat_peer/setup.sh from the pinned requirements.txt beside this file), never the
server's; it imports nothing from this repository. Per call, on `/v1/telephony/twilio`:

    FastAPI websocket -> parse_telephony_websocket (`connected`, `start`) ->
    FastAPIWebsocketTransport(TwilioFrameSerializer) input -> VADProcessor(SileroVADAnalyzer)
    -> StubSTT -> EchoSpeech -> transport output

as in Pipecat's twilio-chatbot example, with the cloud services replaced by stubs that cost
(next to) nothing: `StubSTT` stands where the STT service stands and records, for every audio
frame, the time from the frame's read (stamped by the serializer as it decodes the `media`
message) to its arrival there; when Silero says the caller stopped, it emits a transcript.
`EchoSpeech` answers each transcript with one second of pre-rendered audio (a tone), which the
output transport sends back as `media` at real-time pace. Pipecat reads no key: the `start`
event's `customParameters` are ignored (it has no billing to admit a call to).

`GET /stats` returns the cumulative numbers the bench diffs around a window: audio that reached
the STT stage (ms), a cumulative histogram of the ingest lag (bucket upper bound in seconds ->
count, Prometheus-style), calls open and calls started. On start it prints one JSON line
`{"event":"listening","ws_port":N,"http_port":N}` on stdout (the bench waits for it).

    .venv-bench-pipecat/bin/python -m loadtest.pipecat_peer.server [--host H] [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import signal
import socket
import sys
import time
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, WebSocket
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    OutputAudioRawFrame,
    TranscriptionFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)
from pipecat.workers.runner import WorkerRunner

SAMPLE_RATE = 8000
READ_AT = "streamgate_bench_read_at"
# Upper bounds (s) of the lag histogram; the bench interpolates its p99 inside a bucket.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0,
           float("inf"))
REPLY_S = 1.0
REPLY_CHUNK_MS = 20


class Stats:
    def __init__(self) -> None:
        self.audio_ms = 0.0
        self.unstamped = 0  # audio frames that reached STT without the serializer's stamp
        self.counts = [0] * len(BUCKETS)
        self.calls_open = 0
        self.calls_started = 0
        self.replies = 0

    def observe(self, lag_s: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, lag_s)] += 1

    def as_json(self) -> dict[str, Any]:
        cumulative: dict[str, int] = {}
        total = 0
        for bound, count in zip(BUCKETS, self.counts, strict=True):
            total += count
            cumulative["+Inf" if bound == float("inf") else repr(bound)] = total
        return {"audio_ms": self.audio_ms, "lag_buckets": cumulative,
                "unstamped": self.unstamped, "calls_open": self.calls_open,
                "calls_started": self.calls_started, "replies": self.replies}


STATS = Stats()


class StampingTwilioSerializer(TwilioFrameSerializer):
    """Pipecat's own serializer; it only notes when each audio frame was read."""

    async def deserialize(self, data: str | bytes) -> Frame | None:
        frame = await super().deserialize(data)
        if isinstance(frame, InputAudioRawFrame):
            frame.metadata[READ_AT] = time.perf_counter()
        return frame


class StubSTT(FrameProcessor):
    """Where the STT service stands: consumes the audio, records its lag, and emits a transcript
    when the VAD ends an utterance (what a streaming STT service does, minus the cloud)."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            read_at = frame.metadata.get(READ_AT)
            if read_at is None:
                STATS.unstamped += 1
            else:
                STATS.observe(time.perf_counter() - read_at)
            STATS.audio_ms += 1000.0 * len(frame.audio) / (2 * frame.sample_rate)
            return
        if isinstance(frame, VADUserStoppedSpeakingFrame):
            await self.push_frame(frame, direction)
            await self.push_frame(TranscriptionFrame(
                text="hello this is a test", user_id="caller",
                timestamp=str(time.time()), finalized=True))
            return
        await self.push_frame(frame, direction)


def _reply_audio() -> list[bytes]:
    t = np.arange(int(SAMPLE_RATE * REPLY_S)) / SAMPLE_RATE
    pcm = (3000 * np.sin(2 * np.pi * 440.0 * t)).astype(np.int16).tobytes()
    step = SAMPLE_RATE * REPLY_CHUNK_MS // 1000 * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


REPLY = _reply_audio()


class EchoSpeech(FrameProcessor):
    """The agent and its TTS: one second of pre-rendered audio for every transcript."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            STATS.replies += 1
            for chunk in REPLY:
                await self.push_frame(OutputAudioRawFrame(
                    audio=chunk, sample_rate=SAMPLE_RATE, num_channels=1))
            return
        await self.push_frame(frame, direction)


app = FastAPI()


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return STATS.as_json()


@app.websocket("/v1/telephony/twilio")
async def call(websocket: WebSocket) -> None:
    await websocket.accept()
    _, call_data = await parse_telephony_websocket(websocket)
    serializer = StampingTwilioSerializer(
        stream_sid=call_data["stream_id"], call_sid=call_data["call_id"],
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False))
    transport = FastAPIWebsocketTransport(websocket=websocket, params=FastAPIWebsocketParams(
        audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False,
        serializer=serializer))
    pipeline = Pipeline([
        transport.input(),
        VADProcessor(vad_analyzer=SileroVADAnalyzer()),
        StubSTT(),
        EchoSpeech(),
        transport.output(),
    ])
    worker = PipelineWorker(
        pipeline, idle_timeout_secs=None,
        params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE,
                              audio_out_sample_rate=SAMPLE_RATE))

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(_transport: Any, _ws: Any) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    STATS.calls_open += 1
    STATS.calls_started += 1
    try:
        await runner.run()
    finally:
        STATS.calls_open -= 1


async def serve(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           loop="auto", backlog=4096))
    bound = sock.getsockname()[1]
    # SIGTERM (how the bench stops it) ends it the way uvicorn ends on Ctrl-C: gracefully.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    print(json.dumps({"event": "listening", "ws_port": bound, "http_port": bound}), flush=True)
    await server.serve(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    # As a deployment runs it: warnings and errors only (Pipecat logs every turn at DEBUG).
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
