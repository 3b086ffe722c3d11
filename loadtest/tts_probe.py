"""TTS time to first audio (TTFA): through the gateway, and of the engine alone.

Gateway: sessions on `/v1/tts/stream` each send `text` + `flush` (one write), wait for the
first binary audio frame (that is the TTFA), return credit for every audio frame as it arrives
(the client "plays" instantly, so credit never holds audio back), and send the next request
once `flushed` says all of its audio went out. The first request of each session is a warm-up
and is not counted.

Engine: the same synthesizer class with the same config, instantiated in this process, timed
from the `synthesize()` call to its first audio chunk, with the same number of concurrent
callers. Also timed: to the first `frame_ms` of audio, the size of the gateway's first frame
(`tts.session.chunk_ms`), since the gateway sends audio in frames of that duration.

The overhead is gateway TTFA minus engine TTFA, percentile by percentile (the two runs are
separate: there is no per-request pairing).
"""

from __future__ import annotations

import asyncio
import json
import time
from array import array
from dataclasses import dataclass, field

from loadtest.loadgen import OP_TEXT, LoadGen, Percentiles, Target, WsClient, client_frame
from server.config import SyntheticTtsConfig
from server.models.tts_synthetic import SyntheticSynthesizer

perf_counter = time.perf_counter
TTS_TEXT = "Hello there, how can I help you today?"
FLUSH = client_frame(OP_TEXT, b'{"type":"flush"}')
REQUEST_TIMEOUT_S = 10.0


class TtsClient(WsClient):
    """One TTS session: speak() sends text + flush and resolves with the TTFA once the
    request's audio is all out (`flushed`)."""

    def __init__(self, gen: LoadGen) -> None:
        super().__init__(gen)
        self.flush_at = 0.0
        self.ttfa: float | None = None
        self.done: asyncio.Future[float] | None = None

    def acked(self, nbytes: int) -> None:
        pass  # a TTS server sends no `credit`

    def speak(self, text: str) -> asyncio.Future[float]:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.ttfa = None
        msg = client_frame(OP_TEXT, json.dumps({"type": "text", "text": text}).encode())
        self.flush_at = perf_counter()
        self.transport.write(msg + FLUSH)
        return self.done

    def on_binary(self, nbytes: int) -> None:
        if self.ttfa is None:
            self.ttfa = perf_counter() - self.flush_at
        if self.transport is not None and not self.closing:
            grant = b'{"type":"credit","bytes":%d}' % nbytes
            self.transport.write(client_frame(OP_TEXT, grant))

    def on_message(self, kind: str, msg: dict[str, object]) -> None:
        done = self.done
        if done is None or done.done():
            return
        if kind == "flushed":
            if self.ttfa is None:
                done.set_exception(RuntimeError("flushed without audio"))
            else:
                done.set_result(self.ttfa)
        elif kind == "error":
            done.set_exception(RuntimeError(f"server error: {msg.get('code')}: "
                                            f"{msg.get('message')}"))


@dataclass
class TtfaRun:
    concurrency: int
    requests: int  # measured, per side
    gateway: Percentiles
    engine: Percentiles  # to the engine's first chunk
    engine_frame: Percentiles  # to the engine's first frame_ms of audio
    errors: list[str] = field(default_factory=list)

    @property
    def overhead_p50_ms(self) -> float:
        return self.gateway.p50_ms - self.engine.p50_ms

    @property
    def overhead_p99_ms(self) -> float:
        return self.gateway.p99_ms - self.engine.p99_ms


async def gateway_ttfa(
    target: Target, *, concurrency: int, per_session: int, text: str = TTS_TEXT,
) -> tuple[array[float], list[str]]:
    """TTFA of concurrency x per_session requests through the gateway (seconds)."""
    gen = LoadGen(target)
    samples: array[float] = array("d")
    errors: list[str] = []
    try:
        await gen.connect(concurrency, TtsClient, batch=concurrency)
        errors += [f"{n} x {why}" for why, n in gen.connect_failures.items()]

        async def session(c: TtsClient) -> None:
            for i in range(per_session + 1):  # + 1: the warm-up request
                try:
                    ttfa = await asyncio.wait_for(c.speak(text), REQUEST_TIMEOUT_S)
                except (TimeoutError, RuntimeError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                if i:
                    samples.append(ttfa)

        clients: list[TtsClient] = gen.clients  # type: ignore[assignment]
        await asyncio.gather(*(session(c) for c in clients))
        await gen.close()
        errors += [f"server closed {n} x {why}" for why, n in gen.stats.server_closes.items()]
        return samples, errors
    finally:
        gen.abort_all()


async def engine_ttfa(
    cfg: SyntheticTtsConfig, *, concurrency: int, per_session: int, frame_ms: int,
    text: str = TTS_TEXT,
) -> tuple[array[float], array[float]]:
    """The engine's own TTFA (to its first chunk, to its first frame_ms of audio), seconds."""
    synth = SyntheticSynthesizer("synthetic", cfg)
    await synth.start()
    first_chunk: array[float] = array("d")
    first_frame: array[float] = array("d")
    frame_bytes = frame_ms * cfg.sample_rate // 1000 * 2  # 16-bit samples

    async def one() -> tuple[float, float]:
        t0 = perf_counter()
        chunk_at = frame_at = 0.0
        got = 0
        stream = synth.synthesize(text, voice=None, language="en-US")
        try:
            async for pcm in stream:
                got += len(pcm)
                if not chunk_at:
                    chunk_at = perf_counter() - t0
                if got >= frame_bytes:
                    frame_at = perf_counter() - t0
                    break  # what follows cannot change the first audio's timing
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return chunk_at, frame_at or perf_counter() - t0

    async def caller() -> None:
        for i in range(per_session + 1):
            chunk_at, frame_at = await one()
            if i:
                first_chunk.append(chunk_at)
                first_frame.append(frame_at)

    try:
        await asyncio.gather(*(caller() for _ in range(concurrency)))
    finally:
        await synth.aclose()
    return first_chunk, first_frame


async def measure_ttfa(
    target: Target, cfg: SyntheticTtsConfig, *, concurrency: int, per_session: int,
    frame_ms: int,
) -> TtfaRun:
    gateway, errors = await gateway_ttfa(target, concurrency=concurrency,
                                         per_session=per_session)
    engine, engine_frame = await engine_ttfa(cfg, concurrency=concurrency,
                                             per_session=per_session, frame_ms=frame_ms)
    return TtfaRun(concurrency, concurrency * per_session, Percentiles.of(gateway),
                   Percentiles.of(engine), Percentiles.of(engine_frame), errors)
