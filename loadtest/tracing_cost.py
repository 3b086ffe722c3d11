"""What tracing costs on the ASR path, in process and without sockets:
`python -m loadtest.tracing_cost`.

Issue 17: tracing must cost nothing when off, and what it costs at 100 % sampling must be
known. This drives the server's own objects (AsrEndpoint -> AsrSessionRunner -> the synthetic
engine behind its micro-batcher, no latency) for `--sessions` ASR sessions at once, each
`--seconds` of 20 ms mu-law speech frames (utterances, finals and engine calls included), and
measures process CPU per frame (the streaming part) and per session (admission, `ready`, the
close sequence) in three configurations, each the best of `--repeat` runs, interleaved so a
machine that gets busier mid-run hurts them alike:

- `off`        the shipped default (`[tracing] enabled = false`)
- `off (A/A)`  the same again: the spread between the two is what "nothing measurable" means
- `on 100 %`   every span made, sampled and handed to an exporter that drops it (the SDK's
               span, attribute and processor work; no serialisation or network)

It also times the guard every traced place pays when tracing is off (`if TRACING.on:`), and
counts how many such checks one frame and one session make, so "off costs nothing" is an
upper bound, not a hope.

    python -m loadtest.tracing_cost [--sessions 100] [--seconds 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
import timeit
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from loadtest.loadgen import audio_frames
from server.billing.auth import ANONYMOUS, StaticKeyAuthenticator
from server.billing.meter import PricedMeterFactory
from server.config import Config, load_config
from server.models.registry import aclose_all, build_transcribers, start_all
from server.sessions.asr_runner import AsrAdmission, AsrEndpoint, AsrSessionRunner
from server.sessions.upgrade import UpgradeRequest
from server.telemetry.metrics import Metrics
from server.telemetry.tracing import TRACING
from server.ws.server import WsServer

OVERRIDES: dict[str, Any] = {
    "auth": {"allow_anonymous": True},
    "billing": {"enabled": False},
    "logging": {"level": "WARNING"},
    "server": {"idle_timeout_s": 600},
    "asr": {"session": {"default_model": "synthetic", "usage_interval_s": 600},
            "models": {"synthetic": {"engine": "synthetic", "latency_base_ms": 0.0,
                                     "latency_per_item_ms": 0.0, "max_batch": 64,
                                     "max_wait_ms": 0.0}}},
}
QUERY = {"model": "synthetic", "encoding": "mulaw", "sample_rate": "8000"}
FRAMES_PER_SECOND = 50
# `if TRACING.on:` checks with tracing off: per session (admission's lease, the runner's start,
# the session's end) and per engine call (one local `trace is not None`, cheaper still).
GUARDS_PER_SESSION = 4
MODES = ("off", "off (A/A)", "on 100 %")


class DroppingExporter(SpanExporter):
    """Counts what it is given and keeps none of it."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class CountingWire:
    """What the runner uses of a connection: counts what it sends."""

    def __init__(self) -> None:
        self.write_paused = False
        self.reading_paused = False
        self.sent = 0
        self.close_code: int | None = None

    def send_text(self, data: bytes) -> None:
        self.sent += 1

    def send_binary(self, data: bytes) -> None:
        self.sent += 1

    def flush(self) -> None:
        return None

    def close(self, code: int, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code = code

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False


@dataclass(frozen=True, slots=True)
class Result:
    frame_us: float  # CPU per 20 ms frame, streaming
    session_us: float  # CPU per session: admission + ready + close sequence
    spans: int  # spans exported in the run
    finals: int  # finals the sessions got (the same work in every mode)


async def run(config: Config, sessions: int, seconds: int) -> Result:
    metrics = Metrics()
    engines = build_transcribers({"synthetic": config.asr.models["synthetic"]}, metrics)
    await start_all(engines)
    server = WsServer(config.server, metrics,
                      StaticKeyAuthenticator(config.auth.key_sha256, allow_anonymous=True))
    server._loop = asyncio.get_running_loop()
    server.now = server._loop.time()
    asr = AsrEndpoint(config=config, engines=engines, meters=PricedMeterFactory({}),
                      server=server, metrics=metrics)
    frames = audio_frames("speech")
    gc.collect()
    t_open = time.process_time()
    runners: list[tuple[AsrSessionRunner, CountingWire]] = []
    for _ in range(sessions):
        admitted = await asr.open_session(
            UpgradeRequest(path="/v1/asr/stream", query=dict(QUERY), api_key=None), ANONYMOUS)
        assert isinstance(admitted, AsrAdmission)
        wire = CountingWire()
        runners.append((admitted.start(wire), wire))
    await asyncio.sleep(0)
    opened = time.process_time() - t_open
    t0 = time.process_time()
    for r in range(seconds * FRAMES_PER_SECOND):
        for i, (runner, _) in enumerate(runners):
            runner.on_binary(frames[(r + 37 * i) % len(frames)])
            runner.on_read_done()
        await asyncio.sleep(0)
    streaming = time.process_time() - t0
    t_close = time.process_time()
    for runner, _ in runners:
        runner.on_text(json.dumps({"type": "close"}).encode())
        runner.on_read_done()
    for _ in range(500):
        if all(w.close_code is not None for _, w in runners):
            break
        await asyncio.sleep(0.001)
    for runner, wire in runners:
        runner.on_connection_closed(wire.close_code or 1006)
    await server.close_tasks(5.0)
    closing = time.process_time() - t_close
    finals = sum(r.machine.utterance_count for r, _ in runners)
    await aclose_all(engines)
    return Result(frame_us=streaming / (sessions * seconds * FRAMES_PER_SECOND) * 1e6,
                  session_us=(opened + closing) / sessions * 1e6, spans=0, finals=finals)


def run_mode(config: Config, mode: str, sessions: int, seconds: int) -> Result:
    exporter = DroppingExporter()
    if mode.startswith("on"):
        TRACING.configure(enabled=True, sample_ratio=1.0, span_exporter=exporter)
    try:
        result = asyncio.run(run(config, sessions, seconds))
    finally:
        TRACING.shutdown()
    return Result(result.frame_us, result.session_us, exporter.spans, result.finals)


def guard_ns() -> float:
    """One `if TRACING.on:` with tracing off, in ns (the loop's own cost subtracted)."""
    n = 2_000_000
    glob = {"TRACING": TRACING}
    checked = min(timeit.repeat("if TRACING.on: pass", globals=glob, number=n, repeat=5))
    empty = min(timeit.repeat("pass", number=n, repeat=5))
    return max(0.0, checked - empty) / n * 1e9


def measure(sessions: int, seconds: int, repeat: int) -> dict[str, Result]:
    config = load_config(environ={}, overrides=OVERRIDES)
    best: dict[str, Result] = {}
    for _ in range(repeat):
        for mode in MODES:
            result = run_mode(config, mode, sessions, seconds)
            old = best.get(mode)
            if old is None or result.frame_us < old.frame_us:
                best[mode] = Result(result.frame_us,
                                    min(result.session_us, old.session_us) if old else
                                    result.session_us, result.spans, result.finals)
            elif result.session_us < old.session_us:
                best[mode] = Result(old.frame_us, result.session_us, old.spans, old.finals)
    return best


def table(best: dict[str, Result], sessions: int, seconds: int, repeat: int) -> list[str]:
    off = best["off"]
    guard = guard_ns()
    lines = [
        f"tracing cost, ASR path in process: {sessions} sessions x {seconds} s of 20 ms "
        f"frames, best of {repeat}",
        "| tracing | CPU us per frame | vs off | CPU us per session | vs off | spans "
        "per session | finals |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = best[mode]
        lines.append(
            f"| {mode} | {r.frame_us:.2f} | {r.frame_us / off.frame_us - 1:+.1%} | "
            f"{r.session_us:.0f} | {r.session_us / off.session_us - 1:+.1%} | "
            f"{r.spans / sessions:.0f} | {r.finals} |")
    per_session_us = GUARDS_PER_SESSION * guard / 1000
    lines.append(
        f"tracing off: one guard (`if TRACING.on:`) costs {guard:.1f} ns; a session makes "
        f"{GUARDS_PER_SESSION} ({per_session_us:.3f} us, "
        f"{per_session_us / off.session_us:.4%} of its CPU), a frame none (its engine calls "
        f"test a local for None). The A/A spread, what this machine cannot tell apart: "
        f"{abs(best['off (A/A)'].frame_us / off.frame_us - 1):.1%} per frame, "
        f"{abs(best['off (A/A)'].session_us / off.session_us - 1):.1%} per session.")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    best = measure(args.sessions, args.seconds, args.repeat)
    print("\n".join(table(best, args.sessions, args.seconds, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
