"""Max concurrent real-time sessions on one server: a bounded search over session counts.

Real time: every session sends one 160-byte mu-law frame (20 ms of 8 kHz audio) every 20 ms,
never beyond its credit (loadgen.RealtimeClient, paced by loadgen.RealtimePacer). One set of
sessions grows, and shrinks, as the search goes: a step adds or closes sessions to reach its
count, lets the server settle for `warmup_s`, then measures for `seconds`. A count passes when,
inside its window, p99 frame-to-credit (a frame's send -> the credit returning its bytes; a
frame that had to wait for credit counts from its scheduled time) is under the limit, at
least 99% of the frames due were credited, and no session was refused or lost.

Sessions a step adds connect evenly over `ramp_s` (default 5 s, streamgate's usage report
interval), as calls arrive in a real deployment. Opened together, they would also report
usage together every 5 s for as long as they live (each session's timer starts at its
`ready`), and that burst, not the steady load, would decide the p99.

Counts: `step`, 2 x `step`, ... until one fails (or `max_sessions` passes), then bisection
between the largest pass and the smallest failure, down to `resolution` sessions. The search
stops early when another step would overrun the time budget. Going down after a failure, the
sessions kept drop the frames still waiting for credit (as a telephony client drops late
audio), so one step's overload does not spill into the next step's latencies.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from loadtest.loadgen import (
    FRAME_MS,
    LoadGen,
    Percentiles,
    RealtimeClient,
    RealtimePacer,
    RunResult,
    ServerProbe,
    Signal,
    Target,
    steady_generator,
)

perf_counter = time.perf_counter
CLOSE_WAIT_S = 5.0  # for the sessions closed when a step shrinks the set
RAMP_TICK_S = 0.1  # new sessions connect in small groups this far apart
GENERATOR_BUSY_PCT = 90.0


@dataclass
class Step:
    """One session count, measured."""

    sessions: int
    result: RunResult
    rss_kb: int  # server VmRSS after the window
    why_not: str  # "" when the count passed; else what failed
    backlog_dropped: int = 0  # frames dropped when this step shrank the set

    @property
    def passed(self) -> bool:
        return not self.why_not


@dataclass
class Capacity:
    p99_limit_ms: float
    min_acked: float  # fraction of the frames due that must be credited
    rss_base_kb: int  # server VmRSS before the first session
    steps: list[Step] = field(default_factory=list)
    stopped: str = ""  # why the search ended
    elapsed_s: float = 0.0
    refused: bool = False  # the server refused or closed sessions: a setup problem, not a limit

    @property
    def best(self) -> Step | None:
        """The largest count that passed."""
        return max((s for s in self.steps if s.passed), key=lambda s: s.sessions, default=None)

    @property
    def largest(self) -> Step | None:
        """The largest count measured. It was reached growing the set, so its RSS is the
        memory of exactly that many active sessions (memory freed later is not returned)."""
        return max(self.steps, key=lambda s: s.sessions, default=None)

    def kib_per_active_session(self) -> float | None:
        step = self.largest
        if step is None or not step.result.opened:
            return None
        return (step.rss_kb - self.rss_base_kb) / step.result.opened


def next_count(
    lo: int, hi: int | None, step: int, resolution: int, max_sessions: int
) -> int | None:
    """The next count to try: lo passed (0: none yet), hi failed (None: none yet)."""
    if hi is None:
        n = lo + step
        return n if n <= max_sessions else None
    if hi - lo <= resolution:
        return None
    half = (hi - lo) // 2 // resolution * resolution
    return lo + max(resolution, half)


class CapacitySearch:
    def __init__(
        self, target: Target, probe: ServerProbe, *, signal: Signal = "speech", batch: int = 100,
        warmup_s: float = 2.0, seconds: float = 5.0, ramp_s: float = 5.0,
        p99_limit_ms: float = 20.0, min_acked: float = 0.99,
    ) -> None:
        self.gen = LoadGen(target, signal)
        self.probe = probe
        self.batch = batch
        self.warmup_s = warmup_s
        self.seconds = seconds
        self.ramp_s = ramp_s
        self.p99_limit_ms = p99_limit_ms
        self.min_acked = min_acked
        self.pacer = RealtimePacer([])

    @property
    def clients(self) -> list[RealtimeClient]:
        return self.gen.clients  # type: ignore[return-value]  # only RealtimeClients here

    async def run(
        self, *, step: int, resolution: int, max_sessions: int, budget_s: float,
        first: int | None = None,
    ) -> Capacity:
        cap = Capacity(self.p99_limit_ms, self.min_acked, self.probe.rss_kb())
        started = perf_counter()
        pacing = asyncio.ensure_future(self.pacer.run(perf_counter() + 0.05))
        try:
            lo, hi = 0, None
            n: int | None = first or step
            while n is not None:
                ramp = self.ramp_s if n > len(self.clients) else 0.0
                if perf_counter() - started + ramp + self.warmup_s + self.seconds + 1 > budget_s:
                    cap.stopped = f"time budget ({budget_s:g} s) reached"
                    break
                s = await self.measure(n)
                cap.steps.append(s)
                print(f"bench: real time {format_step(s)}", flush=True)
                if s.result.server_closes or any(k.startswith("HTTP") for k in
                                                 s.result.connect_failures):
                    cap.refused = True
                    cap.stopped = "the server refused or closed sessions"
                    break
                if s.passed:
                    lo = max(lo, n)
                else:
                    hi = n if hi is None else min(hi, n)
                n = next_count(lo, hi, step, resolution, max_sessions)
            else:
                cap.stopped = (f"reached --rt-max {max_sessions}" if hi is None
                               else f"resolved to {resolution} sessions")
        finally:
            pacing.cancel()
            cap.elapsed_s = perf_counter() - started
            await self.gen.close()
            self.gen.abort_all()
        return cap

    async def measure_counts(self, counts: list[int],
                             after_each: Callable[[Step], Awaitable[None]] | None = None,
                             ) -> list[Step]:
        """One step per count, in order (no search), then the sessions are closed.
        `after_each` runs after each step's window, with its sessions still open."""
        pacing = asyncio.ensure_future(self.pacer.run(perf_counter() + 0.05))
        steps = []
        try:
            for n in counts:
                step = await self.measure(n)
                print(f"bench: real time {format_step(step)}", flush=True)
                if after_each is not None:
                    await after_each(step)
                steps.append(step)
            return steps
        finally:
            pacing.cancel()
            await self.gen.close()
            self.gen.abort_all()

    async def measure(self, n: int) -> Step:
        st = self.gen.stats
        failures0, closes0, dropped0 = (Counter(self.gen.connect_failures),
                                        Counter(st.server_closes), st.dropped)
        backlog_dropped = await self.resize(n)
        await asyncio.sleep(self.warmup_s)
        st.latencies, st.final_latencies = array("d"), array("d")
        srv0, gen0 = self.probe.sample(), time.process_time()
        acked0, sent0, deferred0 = st.acked, st.sent, st.deferred
        with steady_generator():
            st.recording = self.pacer.recording = True
            self.pacer.max_lag = 0.0
            t0 = perf_counter()
            await asyncio.sleep(self.seconds)
            st.recording = self.pacer.recording = False
            elapsed = perf_counter() - t0
        srv1, gen1 = self.probe.sample(), time.process_time()
        r = self.gen._result("realtime", n, elapsed, st.acked - acked0, gen1 - gen0, srv1 - srv0)
        r.connect_failures = dict(Counter(self.gen.connect_failures) - failures0)
        r.server_closes = dict(Counter(st.server_closes) - closes0)
        r.dropped = st.dropped - dropped0
        r.target_fps = len(self.clients) * 1000.0 / FRAME_MS
        r.sent_fps = (st.sent - sent0) / elapsed
        r.deferred = st.deferred - deferred0
        r.max_sched_lag_ms = self.pacer.max_lag * 1000.0
        r.final_latency = Percentiles.of(st.final_latencies)
        return Step(n, r, self.probe.rss_kb(), self.verdict(n, r), backlog_dropped)

    async def resize(self, n: int) -> int:
        """Grow or shrink the set to n sessions; the frames dropped from backlogs when shrinking."""
        clients = self.clients
        if n > len(clients):
            await self.grow(n - len(clients))
            return 0
        extra = clients[n:]
        del clients[n:]
        self.pacer.remove(extra)
        for c in extra:
            c.close()
        lost = [c.lost for c in extra if not c.lost.done()]
        if lost:
            await asyncio.wait(lost, timeout=CLOSE_WAIT_S)
        for c in extra:
            if not c.lost.done():
                c.abort()
        return sum(c.drop_backlog() for c in clients)

    async def grow(self, k: int) -> None:
        """Connect k sessions spread evenly over ramp_s; each streams as soon as it is open."""
        ticks = max(1, round(self.ramp_s / RAMP_TICK_S))
        start = perf_counter()
        asked = 0
        for i in range(1, ticks + 1):
            group = round(k * i / ticks) - asked
            if group > 0:
                before = len(self.clients)
                await self.gen.connect(group, RealtimeClient, batch=max(group, self.batch))
                self.pacer.add(self.clients[before:])
                asked += group
            await asyncio.sleep(max(0.0, start + i * RAMP_TICK_S - perf_counter()))

    def verdict(self, n: int, r: RunResult) -> str:
        why = []
        if r.opened < n:
            why.append(f"{n - r.opened} sessions did not open")
        lost = r.dropped + sum(r.server_closes.values())
        if lost:
            why.append(f"{lost} sessions lost")
        due = r.target_fps or 0.0
        if due and r.fps < self.min_acked * due:
            why.append(f"credited {100.0 * r.fps / due:.1f}% of the frames due")
        if not r.latency.samples or not r.latency.p99_ms < self.p99_limit_ms:
            why.append(f"p99 {r.latency.p99_ms:.1f} ms")
        if why and r.gen_cpu_pct >= GENERATOR_BUSY_PCT:
            # One Python core drives every session: past this the generator, not the server,
            # may be what fell behind.
            why.append(f"GENERATOR-BOUND? generator at {r.gen_cpu_pct:.0f}% CPU")
        return "; ".join(why)


def format_step(s: Step) -> str:
    r = s.result
    return (f"{s.sessions} sessions: {r.fps:,.0f}/{r.target_fps or 0:,.0f} frames/s credited, "
            f"p50 {r.latency.p50_ms:.1f} ms, p99 {r.latency.p99_ms:.1f} ms, server CPU "
            f"{r.server_cpu_pct or 0:.0f}%, generator CPU {r.gen_cpu_pct:.0f}%: "
            + ("pass" if s.passed else f"FAIL ({s.why_not})"))
