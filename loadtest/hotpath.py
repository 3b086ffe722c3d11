"""The server's per-frame Python cost, without sockets: `python -m loadtest.hotpath`.

The bench (`make bench`) measures frames/s over real sockets, where the kernel's share moves
with the machine's mood. This harness drives the same objects the server runs (WsConnection ->
AsrSessionRunner -> AsrSession, synthetic engine) from in-memory transports: masked client
frames go into `data_received`, writes are counted, nothing touches the network. It prints
microseconds per frame for streamgate's ASR path and for the raw sans-I/O echo (the same loop),
so a change to the hot path can be judged in seconds; under `valgrind --tool=callgrind` the
instruction counts are repeatable on a shared machine. `--profile` prints cProfile's top lines.

    python -m loadtest.hotpath [--sessions 1000] [--frames 50000] [--batch 1] [--profile]

`--batch N` delivers N frames per `data_received` (what a busy server reads at once).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import sys
import time
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from loadtest.loadgen import FRAME_BYTES, Signal, audio_frames, client_frame
from server.billing.auth import StaticKeyAuthenticator
from server.billing.meter import PricedMeterFactory
from server.config import Config, load_config
from server.models.registry import aclose_all, build_transcribers, start_all
from server.sessions.asr_runner import AsrEndpoint
from server.telemetry.metrics import Metrics
from server.ws.connection import WsConnection
from server.ws.server import WsServer

PATH = (
    "/v1/asr/stream?model=synthetic&encoding=mulaw&sample_rate=8000&vad=medium"
    "&interim_results=false"
)
OVERRIDES: dict[str, Any] = {
    "auth": {"allow_anonymous": True},
    "billing": {"enabled": False},
    "logging": {"level": "WARNING"},
    "server": {"idle_timeout_s": 600},
    "asr": {
        "session": {"default_model": "synthetic", "ingest_queue_ms": 80},
        "models": {"synthetic": {"engine": "synthetic", "latency_base_ms": 5.0,
                                 "latency_per_item_ms": 0.5, "max_batch": 32,
                                 "max_wait_ms": 5.0}},
    },
}


class MemoryTransport:
    """Enough of asyncio.Transport for a WsConnection; writes are counted, and kept in `out`
    only with keep=True (tests read what was sent; the benchmark must not grow)."""

    def __init__(self, keep: bool = False) -> None:
        self.writes = 0
        self.bytes = 0
        self.last = b""
        self.out: bytearray | None = bytearray() if keep else None
        self.closed = False
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)
        self.last = data
        if self.out is not None:
            self.out += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def upgrade_bytes(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class RawEcho:
    """loadtest/echo_servers.py's RawEchoProtocol, minus the event loop."""

    def __init__(self, transport: MemoryTransport) -> None:
        self.proto = ServerProtocol(max_size=65536)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        p = self.proto
        p.receive_data(data)
        for event in p.events_received():
            if isinstance(event, Frame):
                if event.opcode is Opcode.BINARY:
                    p.send_text(b"ack")
            elif isinstance(event, Request):
                p.send_response(p.accept(event))
        chunks = p.data_to_send()
        if chunks:
            self.transport.write(b"".join(chunks))


def _wire(frames: list[bytes], batch: int) -> list[bytes]:
    masked = [client_frame(0x2, f) for f in frames]
    return [b"".join(masked[i:i + batch]) for i in range(0, len(masked) - batch + 1, batch)]


def run_echo(sessions: int, frames: int, batch: int, signal: Signal = "speech") -> float:
    conns = []
    for _ in range(sessions):
        echo = RawEcho(MemoryTransport())
        echo.data_received(upgrade_bytes("/"))
        conns.append(echo)
    wire = _wire(audio_frames(signal), batch)
    rounds = max(1, frames // (sessions * batch))
    t0 = time.process_time()
    for r in range(rounds):
        chunk = wire[r % len(wire)]
        for echo in conns:
            echo.data_received(chunk)
    elapsed = time.process_time() - t0
    return elapsed / (rounds * sessions * batch)


async def run_streamgate(config: Config, sessions: int, frames: int, batch: int,
                         profile: bool, signal: Signal = "speech",
                         ) -> tuple[float, dict[str, float]]:
    metrics = Metrics()
    engines = build_transcribers({"synthetic": config.asr.models["synthetic"]}, metrics)
    await start_all(engines)
    auth = StaticKeyAuthenticator(config.auth.key_sha256, allow_anonymous=True)
    server = WsServer(config.server, metrics, auth)
    server._loop = asyncio.get_running_loop()
    server.now = server._loop.time()
    endpoint = AsrEndpoint(config=config, engines=engines,
                           meters=PricedMeterFactory({("synthetic", "audio_ms"): (0, 60000)}),
                           server=server, metrics=metrics)
    server.router.add("/v1/asr/stream", endpoint)
    conns: list[tuple[WsConnection, MemoryTransport]] = []
    for _ in range(sessions):
        transport = MemoryTransport()
        conn = WsConnection(server)
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(upgrade_bytes(PATH))
        conns.append((conn, transport))
    # Admission runs as tasks (auth, meter); poll rather than reach into the router.
    while any(c.session is None for c, _ in conns):  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    wire = _wire(audio_frames(signal), batch)
    rounds = max(1, frames // (sessions * batch))
    writes0 = sum(t.writes for _, t in conns)
    prof = cProfile.Profile() if profile else None
    # CPU time, loop included: the invoke stage, the engine's batcher and the results run
    # between rounds (sleep(0)), as they would between socket reads.
    t0 = time.process_time()
    if prof is not None:
        prof.enable()
    for r in range(rounds):
        chunk = wire[r % len(wire)]
        for conn, _ in conns:
            conn.data_received(chunk)
        await asyncio.sleep(0)
    if prof is not None:
        prof.disable()
    busy = time.process_time() - t0
    total = rounds * sessions * batch
    writes = sum(t.writes for _, t in conns) - writes0
    for conn, _ in conns:
        conn.data_received(client_frame(0x8, b"\x03\xe8"))
        conn.connection_lost(None)
    await server.close_tasks(2.0)
    await aclose_all(engines)
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return busy / total, {"writes_per_frame": writes / total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.hotpath", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=50000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--signal", choices=("speech", "tone"), default="speech",
                        help="tone: webrtcvad calls it noise, so no utterance, no resampling")
    parser.add_argument("--only", choices=("echo", "streamgate"))
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each; the fastest counts (noise only ever adds time)")
    args = parser.parse_args(argv)
    assert len(audio_frames()[0]) == FRAME_BYTES
    os.environ.setdefault("STREAMGATE_LOGGING__LEVEL", "WARNING")
    config = load_config(overrides=OVERRIDES)
    gc.collect()
    import uvloop

    results: dict[str, float] = {}
    extra: dict[str, float] | None = None
    for _ in range(max(1, args.repeat)):
        if args.only in (None, "echo"):
            t = run_echo(args.sessions, args.frames, args.batch, args.signal)
            results["raw-echo"] = min(t, results.get("raw-echo", t))
        if args.only in (None, "streamgate"):
            t, extra = uvloop.run(
                run_streamgate(config, args.sessions, args.frames, args.batch, args.profile,
                               args.signal))
            results["streamgate"] = min(t, results.get("streamgate", t))
    if extra is not None:  # `--only echo` runs no streamgate session
        print(f"streamgate writes per frame: {extra['writes_per_frame']:.2f}")
    for name, seconds in results.items():
        print(f"{name:12s} {seconds * 1e6:7.2f} us/frame (batch {args.batch})")
    if len(results) == 2:
        print(f"ratio streamgate/raw-echo cost: {results['streamgate'] / results['raw-echo']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
