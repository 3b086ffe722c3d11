"""The TTS session path's own CPU per request, in process: `/v1/tts/stream` sessions (the
endpoint, runner and machine of server/sessions/) on a wire that plays audio at once (credit
back for every frame, as loadtest/tts_probe.py's client does), the synthetic engine with no
latency (each chunk one loop turn), a resume store in memory. No sockets, no WebSocket
framing, no wallet: what is left is the session's own work per engine chunk and per request,
measured in CPU time, best of --repeat runs (this machine is shared).

    python -m loadtest.tts_cpu [--sessions 20] [--requests 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Coroutine
from typing import Any

import msgspec

from server.billing.auth import ANONYMOUS
from server.billing.meter import PricedMeterFactory
from server.config import SyntheticTtsConfig, load_config
from server.models.tts_synthetic import SyntheticSynthesizer
from server.sessions.resume import MemoryResumeStore
from server.sessions.tts_runner import TtsEndpoint, TtsSessionRunner
from server.sessions.upgrade import Admitted, UpgradeRequest
from server.telemetry.metrics import Metrics

SPOKEN = "Hello there, how can I help you today?"  # loadtest/tts_probe.py's
TEXT = b'{"type":"text","text":"%s"}' % SPOKEN.encode()
FLUSH = b'{"type":"flush"}'
CLOSE = b'{"type":"close"}'


class Host:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        return task

    def session_opened(self) -> None:
        pass

    def session_closed(self) -> None:
        pass


class PlayingWire:
    """Credit back for every frame (on the next loop turn, as from a socket); `flushed` ends
    a request, and the next one is sent at once until `left` runs out."""

    def __init__(self, left: int) -> None:
        self.runner: TtsSessionRunner | None = None
        self.write_paused = False
        self.activity = False
        self.left = left
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.frames = 0

    def send_binary(self, data: bytes) -> None:
        self.frames += 1
        asyncio.get_running_loop().call_soon(self._credit, len(data))

    def _credit(self, n: int) -> None:
        if self.runner is not None:
            self.runner.on_text(b'{"type":"credit","bytes":%d}' % n)

    def send_text(self, data: bytes) -> None:
        if b'"flushed"' in data:
            asyncio.get_running_loop().call_soon(self.speak)

    def speak(self) -> None:
        assert self.runner is not None
        if self.left <= 0:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.left -= 1
        self.runner.on_text(TEXT)
        self.runner.on_text(FLUSH)

    def flush(self) -> None:
        pass

    def close(self, code: int, reason: str = "") -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def one_run(sessions: int, requests: int) -> tuple[float, int]:
    """CPU seconds per request and engine chunks per request."""
    config = load_config(environ={}, overrides={"billing": {"enabled": False}})
    engine = SyntheticSynthesizer("synthetic", msgspec.structs.replace(
        SyntheticTtsConfig(), first_audio_ms=0.0, rtf=0.0))
    await engine.start()
    host = Host()
    endpoint = TtsEndpoint(config=config, engines={"synthetic": engine},
                           meters=PricedMeterFactory({}), server=host, metrics=Metrics(),
                           resume_store=MemoryResumeStore())
    wires: list[PlayingWire] = []
    per = requests // sessions
    for _ in range(sessions):
        decision = await endpoint.admit(UpgradeRequest(
            path="/v1/tts/stream", query={"model": "synthetic"}, api_key=None), ANONYMOUS)
        assert isinstance(decision, Admitted)
        wire = PlayingWire(per)
        runner = decision.start(wire)  # type: ignore[arg-type]
        assert isinstance(runner, TtsSessionRunner)
        wire.runner = runner
        wires.append(wire)
    for w in wires:  # warm-up request
        w.left += 1
        w.speak()
    await asyncio.sleep(0.05)
    gc.collect()
    t0 = time.process_time()
    await asyncio.gather(*(w.done for w in wires))
    cpu = time.process_time() - t0
    for w in wires:
        assert w.runner is not None
        w.runner.on_text(CLOSE)
    await asyncio.gather(*host.tasks)
    await engine.aclose()
    return cpu / (per * sessions), -(-engine.duration_ms(SPOKEN) // engine.cfg.chunk_ms)


def main(argv: list[str] | None = None) -> int:
    import uvloop

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    best = float("inf")
    chunks = 0
    for _ in range(args.repeat):
        cpu, chunks = uvloop.run(one_run(args.sessions, args.requests))
        best = min(best, cpu)
    print(f"TTS session path: {best * 1e6:.0f} us CPU per request ({chunks} engine chunks, "
          f"{best * 1e6 / max(1, chunks):.1f} us per chunk), best of {args.repeat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
