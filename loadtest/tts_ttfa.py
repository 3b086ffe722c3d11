"""TTS time to first audio, repeated: the bench's TTS measurement (loadtest/tts_probe.py,
docs/benchmarks.md "TTS time to first audio") against one server started as `make bench`
starts it (`python -m server serve`, billing on with embedded Redis and PostgreSQL, the bench
tenant, the server pinned to one CPU and this process to the other), several rounds in a row,
each round's gateway and engine TTFA, their overhead, and the server's CPU time per request.

    python -m loadtest.tts_ttfa [--rounds 5] [--sessions 20] [--per-session 10]

Rounds alternate gateway and engine measurements, so a stretch of load from other processes
on this machine shows up as a spread across rounds rather than shifting one side only. The
server CPU per request is the server process's user + system time over a round's measured
requests (connections are opened before and closed after it), divided by their number.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path

from loadtest import bench
from loadtest.bench_report import ServerRun
from loadtest.loadgen import OP_TEXT, LoadGen, Percentiles, Target, client_frame
from loadtest.pin import raise_nofile_limit
from loadtest.procfs import cpu_seconds
from loadtest.tts_probe import (
    REQUEST_TIMEOUT_S,
    TTS_TEXT,
    TtsClient,
    engine_ttfa,
    perf_counter,
)
from server.config import SyntheticTtsConfig


class DeferredCreditClient(TtsClient):
    """--deferred-credit: the credit for a frame leaves a loop turn later, after this
    process has read (and timed) the other sessions' frames that arrived with it, so a
    session's TTFA does not include the credit writes of the sessions read before it (one
    syscall each). For comparison only: the bench's client (TtsClient) writes at once."""

    def on_binary(self, nbytes: int) -> None:
        if self.ttfa is None:
            self.ttfa = perf_counter() - self.flush_at
        asyncio.get_running_loop().call_soon(self._grant, nbytes)

    def _grant(self, nbytes: int) -> None:
        if self.transport is not None and not self.closing:
            grant = b'{"type":"credit","bytes":%d}' % nbytes
            self.transport.write(client_frame(OP_TEXT, grant))


async def gateway_round(target: Target, pid: int, *, sessions: int, per_session: int,
                        deferred_credit: bool = False
                        ) -> tuple[array[float], float, list[str]]:
    """One round: TTFA samples (s) and server CPU seconds per measured request."""
    gen = LoadGen(target)
    samples: array[float] = array("d")
    errors: list[str] = []
    clk = os.sysconf("SC_CLK_TCK")
    try:
        await gen.connect(sessions, DeferredCreditClient if deferred_credit else TtsClient,
                          batch=sessions)
        clients: list[TtsClient] = gen.clients  # type: ignore[assignment]
        # The warm-up request of every session, together, before the CPU is read.
        await asyncio.gather(*(c.speak(TTS_TEXT) for c in clients))
        cpu0 = sum(cpu_seconds(pid, clk))

        async def session(c: TtsClient) -> None:
            for _ in range(per_session):
                try:
                    samples.append(await asyncio.wait_for(c.speak(TTS_TEXT),
                                                          REQUEST_TIMEOUT_S))
                except (TimeoutError, RuntimeError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return

        await asyncio.gather(*(session(c) for c in clients))
        cpu1 = sum(cpu_seconds(pid, clk))
        await gen.close()
        return samples, (cpu1 - cpu0) / max(1, len(samples)), errors
    finally:
        gen.abort_all()


async def measure(live: bench.LiveServer, run: ServerRun, args: argparse.Namespace,
                  engine_cfg: SyntheticTtsConfig, frame_ms: int) -> None:
    target = live.target(bench.TTS_PATH, "credit")
    rows: list[tuple[float, float, float, float, float]] = []
    for r in range(args.rounds):
        gw, cpu_per_req, errors = await gateway_round(
            target, live.process.pid, sessions=args.sessions, per_session=args.per_session,
            deferred_credit=args.deferred_credit)
        eng, _ = await engine_ttfa(engine_cfg, concurrency=args.sessions,
                                   per_session=args.per_session, frame_ms=frame_ms)
        g, e = Percentiles.of(gw), Percentiles.of(eng)
        rows.append((g.p50_ms - e.p50_ms, g.p99_ms - e.p99_ms, g.p50_ms, g.p99_ms,
                     cpu_per_req * 1000))
        print(f"round {r + 1}: gateway p50/p99 {g.p50_ms:.2f}/{g.p99_ms:.2f} ms (max "
              f"{g.max_ms:.2f}), engine {e.p50_ms:.2f}/{e.p99_ms:.2f} ms, overhead "
              f"{g.p50_ms - e.p50_ms:.2f}/{g.p99_ms - e.p99_ms:.2f} ms, server CPU "
              f"{cpu_per_req * 1000:.2f} ms/request ({len(gw)} requests)"
              + (f", errors: {errors[:3]}" if errors else ""), flush=True)
        run.errors += errors
    p50s, p99s = [r[0] for r in rows], [r[1] for r in rows]
    cpus = [r[4] for r in rows]
    print(f"overhead p50: median {statistics.median(p50s):.2f} ms (min {min(p50s):.2f}, max "
          f"{max(p50s):.2f}); p99: median {statistics.median(p99s):.2f} ms (min "
          f"{min(p99s):.2f}, max {max(p99s):.2f}); server CPU per request: median "
          f"{statistics.median(cpus):.2f} ms (min {min(cpus):.2f})", flush=True)


async def amain(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="streamgate-tts-ttfa-") as tmp:
        workdir = Path(tmp)
        os.chmod(tmp, 0o711)  # PostgreSQL (as `postgres`) reaches its data directory
        engine_cfg, frame_ms = bench.tts_settings(workdir, args)
        started = time.monotonic()
        run = await bench.with_server(
            "streamgate-tts", args, workdir,
            lambda live, run: measure(live, run, args, engine_cfg, frame_ms))
        print(f"done in {time.monotonic() - started:.0f} s; server exit code "
              f"{run.health.exit_code if run.health else None}", flush=True)
        for err in run.errors[:10]:
            print(f"error: {err}", file=sys.stderr)
        return 1 if run.errors else 0


def main(argv: list[str] | None = None) -> int:
    import uvloop

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--per-session", type=int, default=10)
    p.add_argument("--quiet-wait", type=float, default=0.0)
    p.add_argument("--deferred-credit", action="store_true",
                   help="the client's credit writes a loop turn after the frame is timed")
    own, rest = p.parse_known_args(argv)
    args = bench.parse_args(["--only", "tts", "--no-write", "--quiet-wait",
                             str(own.quiet_wait), *rest])
    vars(args).update(vars(own))
    raise_nofile_limit()
    bench.setup_cpus(args)
    try:
        return uvloop.run(amain(args))
    finally:
        bench.stop_all_servers()


if __name__ == "__main__":
    sys.exit(main())
