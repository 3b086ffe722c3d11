"""What a bench run found, and docs/benchmarks.md: results, ratios, targets, observations."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path

from loadtest.bench_tenant import Balance
from loadtest.call_floor import CALL_SECOND_FRAMES, FloorStage
from loadtest.capacity import Capacity, Step
from loadtest.loadgen import FRAME_BYTES, FRAME_MS, IdleResult, RunResult
from loadtest.tts_probe import TTS_TEXT, TtfaRun
from loadtest.twilio_calls import (
    MAX_PING_RTT_P99_MS,
    MAX_SERVER_CPU_PCT,
    MIN_ACCEPTED,
    CallCapacity,
)
from loadtest.workers_compare import NodeRun, efficiency

ECHO_NAMES = ("ws-echo", "raw-echo")
CLOSED_LOOP_NAMES = (*ECHO_NAMES, "streamgate")
REALTIME_RUN = "streamgate-realtime"
# A fresh raw-echo under the same real-time search: what a server of this design holds on
# this machine when it does no work at all.
REALTIME_CEILING = "raw-echo-realtime"
# The same real-time sessions against `--workers 1` (pinned) and `--workers 2` (both CPUs):
# streamgate-workers-1, streamgate-workers-2.
WORKERS_RUN = "streamgate-workers-"

# Issue 5's targets (one run, one server core).
MIN_VS_RAW_ECHO = 0.6
MIN_VS_WS_ECHO = 1.5
MIN_REALTIME_SESSIONS = 1000
P99_LIMIT_MS = 20.0
MAX_IDLE_KIB = 50.0
MAX_TTFA_OVERHEAD_P99_MS = 5.0
# Issue 13's: two workers' CPU per session within 1/0.9 of one worker's.
MIN_WORKERS_EFFICIENCY = 0.9
# Issue 15's (one run, one server core).
TELEPHONY_RUN = "streamgate-telephony"
PEER_RUN = "pipecat-telephony"
MIN_CALLS = 1000
MIN_VS_PEER = 20.0
MAX_CALL_KIB = 100.0
MAX_IDLE_KIB_15 = 50.0
MIN_VS_RAW_ECHO_15 = 0.6
MIN_REALTIME_VS_CEILING = 0.8
MAX_TTFA_OVERHEAD_P99_MS_15 = 2.0
TTFA_SESSIONS_15 = 20


# --- what a server run found ---------------------------------------------------------------------


@dataclass
class Health:
    """A server's behaviour seen from outside: logs, exit code, metrics."""

    alive_after_close: bool = True
    exit_code: int | None = None
    log_levels: dict[str, int] = field(default_factory=dict)
    log_messages: list[tuple[str, int]] = field(default_factory=list)  # most common first
    raw_lines: list[str] = field(default_factory=list)  # non-JSON stderr (tracebacks...)
    metrics: dict[str, float] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if not self.alive_after_close:
            out.append("server died during the run")
        if self.exit_code not in (0, None):
            out.append(f"exit code {self.exit_code}")
        bad = {k: v for k, v in self.log_levels.items() if k in ("error", "critical")}
        if bad:
            out.append("log: " + ", ".join(f"{v} {k}" for k, v in bad.items()))
        if self.raw_lines:
            out.append(f"{len(self.raw_lines)} non-JSON stderr lines")
        return out


@dataclass
class ServerRun:
    """One server process, started fresh, and what was measured against it."""

    name: str  # ws-echo, raw-echo, streamgate, streamgate-idle, streamgate-realtime
    health: Health = field(default_factory=Health)
    errors: list[str] = field(default_factory=list)
    ack: RunResult | None = None  # closed loop, one frame in flight
    window: RunResult | None = None  # closed loop, W frames in flight
    idle: IdleResult | None = None
    tts: list[TtfaRun] = field(default_factory=list)
    capacity: Capacity | None = None
    nodes: list[NodeRun] = field(default_factory=list)  # --workers 1 or 2, N sessions
    calls: CallCapacity | None = None  # Twilio calls per core (issue 15)
    balances: tuple[Balance, Balance] | None = None  # the bench tenant's, before and after

    def closed_loops(self) -> list[RunResult]:
        return [r for r in (self.ack, self.window) if r is not None]

    def failures(self) -> list[str]:
        """What makes this run's numbers untrustworthy (empty if none)."""
        out = list(self.errors)
        for r in self.closed_loops():
            if r.connect_failures:
                out.append(f"{sum(r.connect_failures.values())} connections failed to open")
            if r.dropped:
                out.append(f"{r.dropped} connections dropped")
            if r.server_closes:
                out.append(f"{sum(r.server_closes.values())} connections closed by the server")
        idle = self.idle
        if idle is not None and idle.connect_failures:
            out.append(f"idle sessions that did not open: {idle.connect_failures}")
        if idle is not None and (idle.server_closes or idle.dropped):
            out.append(f"idle sessions closed by the server: {idle.server_closes}, dropped "
                       f"{idle.dropped}")
        out.extend(f"TTS x{t.concurrency}: {e}" for t in self.tts for e in t.errors[:3])
        if self.capacity is not None and self.capacity.refused:
            out.append(f"real time: {self.capacity.stopped}")
        if self.calls is not None and self.calls.refused:
            out.append(f"Twilio calls: {self.calls.stopped}")
        for node in self.nodes:
            out.extend(f"--workers {node.workers}, {node.sessions} sessions: {p}"
                       for p in node.problems())
        if not self.health.alive_after_close:
            out.append("server died")
        elif self.health.exit_code not in (0, None):
            out.append(f"server exit code {self.health.exit_code}")
        return out

    def has_results(self) -> bool:
        return bool(self.closed_loops() or self.idle or self.tts or self.capacity
                    or self.nodes or self.calls)


def analyse_stderr(path: Path, json_logs: bool) -> Health:
    health = Health()
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return health
    for line in text.splitlines():
        if not line.strip():
            continue
        rec: object = None
        if json_logs:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
        if isinstance(rec, dict):
            level = str(rec.get("level", "?"))
            levels[level] += 1
            exc = str(rec.get("exc", "")).strip().splitlines()
            tail = f" [{exc[-1]}]" if exc else ""
            messages[f"{level} {rec.get('logger', '')}: {rec.get('msg', '')}{tail}"[:240]] += 1
        elif len(health.raw_lines) < 40:
            health.raw_lines.append(line[:240])
    health.log_levels = dict(levels)
    health.log_messages = messages.most_common(8)
    return health


# --- numbers -------------------------------------------------------------------------------------


def _mb(kb: int | None) -> str:
    return "-" if not kb else f"{kb / 1024:.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _cpu(r: RunResult) -> str:
    if r.server_cpu_pct is None:
        return "-"
    return f"{r.server_cpu_pct:.0f}% ({r.server_sys_pct or 0:.0f}% sys)"


def _labels(key: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', key))


def by_name(runs: list[ServerRun]) -> dict[str, ServerRun]:
    return {run.name: run for run in runs}


def shape_fps(runs: list[ServerRun], shape: str) -> dict[str, float]:
    """frames/s by server for one closed-loop shape ("ack" or "window")."""
    out = {}
    for run in runs:
        r = run.ack if shape == "ack" else run.window
        if run.name in CLOSED_LOOP_NAMES and r is not None and r.fps > 0:
            out[run.name] = r.fps
    return out


def ratios(runs: list[ServerRun], shape: str) -> dict[str, float]:
    fps = shape_fps(runs, shape)
    out = {}
    for a, b in (("streamgate", "raw-echo"), ("streamgate", "ws-echo"), ("raw-echo", "ws-echo")):
        if a in fps and b in fps:
            out[f"{a} / {b}"] = fps[a] / fps[b]
    return out


def capacity_run(runs: list[ServerRun], name: str = REALTIME_RUN) -> Capacity | None:
    return next((run.capacity for run in runs if run.name == name and run.capacity), None)


def capacity_sessions(cap: Capacity) -> str:
    """"N sessions", ">= N" when no count failed (the search ran out of budget or counts)."""
    best = cap.best
    sessions = 0 if best is None else best.sessions
    open_ended = best is not None and best is cap.largest
    return f"{'>= ' if open_ended else ''}{sessions} sessions"


def idle_run(runs: list[ServerRun]) -> IdleResult | None:
    return next((run.idle for run in runs if run.idle is not None), None)


def tts_runs(runs: list[ServerRun]) -> list[TtfaRun]:
    return [t for run in runs for t in run.tts]


def cpu_per_session(step: Step) -> tuple[float, float] | None:
    """(% of one core, microseconds of CPU per session-second) for a real-time step."""
    r = step.result
    if r.server_cpu_pct is None or r.server_cpu_s is None or not r.opened:
        return None
    return r.server_cpu_pct / r.opened, 1e6 * r.server_cpu_s / (r.opened * r.seconds)


# --- targets -------------------------------------------------------------------------------------


def node_runs(runs: list[ServerRun]) -> dict[int, NodeRun]:
    """The --workers comparison by worker count: the same N sessions against each."""
    first = [run.nodes[0] for run in runs if run.nodes]
    return {node.workers: node for node in first}


def half_load_run(runs: list[ServerRun]) -> NodeRun | None:
    """One worker at N/2 sessions: the load each of two workers carries."""
    return next((node for run in runs for node in run.nodes[1:] if node.workers == 1), None)


@dataclass
class Goal:
    what: str
    measured: str
    met: bool | None  # None: not measured in this run
    reported: bool = False  # no target: the number is what is asked for


def goals(runs: list[ServerRun]) -> list[Goal]:
    window = ratios(runs, "window")
    out = []
    for ref, least in (("raw-echo", MIN_VS_RAW_ECHO), ("ws-echo", MIN_VS_WS_ECHO)):
        ratio = window.get(f"streamgate / {ref}")
        out.append(Goal(
            f"full ASR ingest >= {least:g}x {ref} in frames/s (window shape)",
            "-" if ratio is None else f"{ratio:.2f}x",
            None if ratio is None else ratio >= least))
    cap = capacity_run(runs)
    if cap is None:
        measured, met = "-", None
    else:
        best = cap.best
        measured = capacity_sessions(cap)
        met = best is not None and best.sessions >= MIN_REALTIME_SESSIONS
        ceiling = capacity_run(runs, REALTIME_CEILING)
        if ceiling is not None:
            measured += f" (raw-echo, no work at all: {capacity_sessions(ceiling)})"
    out.append(Goal(f">= {MIN_REALTIME_SESSIONS} concurrent real-time telephony sessions per "
                    f"core with p99 frame-to-credit < {P99_LIMIT_MS:g} ms", measured, met))
    idle = idle_run(runs)
    out.append(Goal(f"< {MAX_IDLE_KIB:g} KiB RSS per idle session",
                    "-" if idle is None else f"{idle.kib_per_session:.1f} KiB",
                    None if idle is None else idle.kib_per_session < MAX_IDLE_KIB))
    tts = [t for t in tts_runs(runs) if t.gateway.samples and t.engine.samples]
    worst = max(tts, key=lambda t: t.overhead_p99_ms, default=None)
    out.append(Goal(
        f"gateway overhead on TTS time-to-first-audio < {MAX_TTFA_OVERHEAD_P99_MS:g} ms p99",
        "-" if worst is None else f"{worst.overhead_p99_ms:.1f} ms (x{worst.concurrency})",
        None if worst is None else worst.overhead_p99_ms < MAX_TTFA_OVERHEAD_P99_MS))
    return out + workers_goals(runs)


def workers_goals(runs: list[ServerRun]) -> list[Goal]:
    nodes = node_runs(runs)
    one, two = nodes.get(1), nodes.get(2)
    shape = "the same real-time sessions for the same time"
    if one is not None:
        shape = (f"the same {one.sessions} real-time sessions for {one.window.seconds:.0f} s")
    ratio = None if one is None or two is None else efficiency(one, two)
    measured = "-"
    if ratio is not None and one is not None and two is not None:
        measured = (f"{ratio:.2f}x: {one.cpu_us_per_session_s():,.0f} us of CPU per "
                    f"session-second with 1 worker, {two.cpu_us_per_session_s():,.0f} with 2; "
                    f"the generator took {_pct(one.pct(one.window.generator_cpu_s))} of a core "
                    f"beside 1 worker, {_pct(two.pct(two.window.generator_cpu_s))} of the same "
                    f"two cores beside 2")
    out = [Goal(f"`--workers 2` per-core efficiency >= {MIN_WORKERS_EFFICIENCY:g}x `--workers "
                f"1`'s (CPU per session-second; {shape})", measured,
                None if ratio is None else ratio >= MIN_WORKERS_EFFICIENCY)]
    sup = None if two is None else two.window
    out.append(Goal(
        "the supervisor's own cost while its node carries them (`--workers 2`)",
        "-" if sup is None or two is None else
        f"{two.pct(sup.supervisor_cpu_s) or 0:.2f}% of a core, "
        f"{(sup.supervisor_rss_kb or 0) / 1024:.0f} MB RSS",
        None if sup is None else True, reported=True))
    return out


def goals_table(runs: list[ServerRun]) -> list[str]:
    """Issue 5's and 13's targets that issue 15's table does not restate."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for g in goals(runs):
        if not ("ws-echo" in g.what or "workers" in g.what):
            continue
        met = ("not measured" if g.met is None else "(reported)" if g.reported
               else "yes" if g.met else "**NO**")
        lines.append(f"| {g.what} | {g.measured} | {met} |")
    return lines


# --- issue 15 ------------------------------------------------------------------------------------


def calls_run(runs: list[ServerRun], name: str) -> CallCapacity | None:
    return next((run.calls for run in runs if run.name == name and run.calls), None)


def _calls(cap: CallCapacity) -> str:
    return f"{'>= ' if cap.open_ended else ''}{cap.calls:,} calls"


def _peer_calls(cap: CallCapacity) -> str:
    best = cap.best
    per_call = None if best is None else best.cpu_pct_per_call
    return f"Pipecat: {_calls(cap)}" + ("" if per_call is None
                                        else f" ({per_call:.3f}% of the core per call)")


def _and(*parts: bool | None) -> bool | None:
    """All met -> True; any not met -> False; else (something not measured) None."""
    if any(p is False for p in parts):
        return False
    return None if any(p is None for p in parts) else True


@dataclass
class Target15:
    what: str
    measured: str
    reference: str  # the peer's value (Pipecat, raw-echo, the engine alone)
    met: bool | None  # None: not measured (or a rule not measured) in this run


def issue15_targets(runs: list[ServerRun]) -> list[Target15]:
    ours, peer = calls_run(runs, TELEPHONY_RUN), calls_run(runs, PEER_RUN)
    out = []
    rules = (f"every call connected, no audio dropped, >= {100 * MIN_ACCEPTED:g}% of the audio "
             f"sent accepted, server CPU <= {MAX_SERVER_CPU_PCT:g}%, p99 ingest lag < "
             f"{ours.lag_limit_ms if ours else 20:g} ms, ping RTT p99 < "
             f"{MAX_PING_RTT_P99_MS:g} ms")
    if ours is None:
        measured, met = "-", None
    else:
        best = ours.best
        measured = _calls(ours)
        if best is not None:
            measured += (f" ({best.server_cpu_pct:.0f}% of the core, "
                         f"{best.cpu_pct_per_call or 0:.3f}% per call; ping RTT p99 "
                         f"{best.rtt.p99_ms:.1f} ms; ingest lag p99 "
                         + ("not measured" if best.lag_p99_ms is None
                            else f"{best.lag_p99_ms:.1f} ms") + ")")
        met = ours.calls >= MIN_CALLS
        if met and not ours.lag_measured:
            met = None  # the lag rule could not be checked: not judged
    out.append(Target15(f"1. >= {MIN_CALLS:,} concurrent Twilio calls per core, full call path, "
                        f"billing on ({rules})", measured,
                        "-" if peer is None else _peer_calls(peer), met))
    ratio: float | None = None
    if ours is not None and peer is not None and peer.calls > 0:
        ratio = ours.calls / peer.calls
    measured = ("-" if ratio is None or ours is None or peer is None
                else f"{ratio:.1f}x ({ours.calls:,} / {peer.calls:,})")
    ours_cpu = None if ours is None or ours.best is None else ours.best.cpu_pct_per_call
    peer_cpu = None if peer is None or peer.best is None else peer.best.cpu_pct_per_call
    if ratio is not None and ours_cpu and peer_cpu:
        measured += (f"; CPU per call {ours_cpu:.3f}% vs Pipecat's {peer_cpu:.3f}% of the core: "
                     f"{peer_cpu / ours_cpu:.1f}x")
    if ours is not None and peer is not None and peer.calls == 0 and peer.steps:
        measured = (f"Pipecat kept up with none of the counts tried (smallest: "
                    f"{min(s.calls for s in peer.steps)})")
    out.append(Target15(
        f"2. >= {MIN_VS_PEER:g}x Pipecat's calls per core (same run, generator and rules; "
        f"Pipecat's lag rule: audio at its STT stage within "
        f"{peer.lag_limit_ms if peer else 200:g} ms)", measured,
        "-" if peer is None else f"Pipecat 1.14: {_calls(peer)}",
        None if ratio is None else ratio >= MIN_VS_PEER))
    per_call = None if ours is None else ours.kib_per_call()
    peer_call = None if peer is None else peer.kib_per_call()
    idle = idle_run(runs)
    out.append(Target15(
        f"3. <= {MAX_CALL_KIB:g} KiB RSS per active call and <= {MAX_IDLE_KIB_15:g} KiB per "
        "idle session",
        ("-" if per_call is None else f"{per_call:,.0f} KiB per call") + "; "
        + ("-" if idle is None else f"{idle.kib_per_session:.1f} KiB per idle session"),
        "-" if peer_call is None else f"Pipecat: {peer_call:,.0f} KiB per call",
        _and(None if per_call is None else per_call <= MAX_CALL_KIB,
             None if idle is None else idle.kib_per_session <= MAX_IDLE_KIB_15)))
    window = ratios(runs, "window").get("streamgate / raw-echo")
    cap, ceiling = capacity_run(runs), capacity_run(runs, REALTIME_CEILING)
    rt: float | None = None
    if (cap is not None and ceiling is not None and ceiling.best is not None
            and ceiling.best.sessions > 0):
        rt = (cap.best.sessions if cap.best else 0) / ceiling.best.sessions
    fps = shape_fps(runs, "window")
    out.append(Target15(
        f"4. our protocol: window-shape ingest >= {MIN_VS_RAW_ECHO_15:g}x raw-echo frames/s and "
        f"real-time sessions >= {MIN_REALTIME_VS_CEILING:g}x raw-echo's ceiling",
        ("-" if window is None else f"{window:.2f}x") + "; "
        + ("-" if rt is None or cap is None else
           f"{rt:.2f}x ({cap.best.sessions if cap.best else 0} sessions)"),
        ("-" if "raw-echo" not in fps else f"raw-echo: {fps['raw-echo']:,.0f} frames/s")
        + ("" if ceiling is None else f", {capacity_sessions(ceiling)}"),
        _and(None if window is None else window >= MIN_VS_RAW_ECHO_15,
             None if rt is None else rt >= MIN_REALTIME_VS_CEILING)))
    tts = next((t for t in tts_runs(runs) if t.concurrency == TTFA_SESSIONS_15
                and t.gateway.samples and t.engine.samples), None)
    out.append(Target15(
        f"5. TTS time-to-first-audio overhead < {MAX_TTFA_OVERHEAD_P99_MS_15:g} ms p99 at "
        f"{TTFA_SESSIONS_15} sessions",
        "-" if tts is None else f"{tts.overhead_p99_ms:.2f} ms",
        "-" if tts is None else (f"engine alone: first chunk p99 {tts.engine.p99_ms:.1f} ms; "
                                 f"gateway p99 {tts.gateway.p99_ms:.1f} ms"),
        None if tts is None else tts.overhead_p99_ms < MAX_TTFA_OVERHEAD_P99_MS_15))
    return out


def floor_lines(runs: list[ServerRun], floor: list[FloorStage]) -> list[str]:
    """Issue 15 target 1 against what the libraries alone cost per frame (loadtest.call_floor)."""
    lines = ["| stage (cumulative) | us per frame | us per call-second | calls in 90% of a core |",
             "|---|---|---|---|"]
    for s in floor:
        lines.append(f"| {s.name} | {s.us_per_frame:.2f} | {s.us_per_call_second:,.0f} | "
                     f"{s.calls_at(MAX_SERVER_CPU_PCT):,.0f} |")
    libs = floor[-1].us_per_frame
    echo = by_name(runs).get("raw-echo")
    window = None if echo is None else echo.window
    lines.append("")
    if window is not None and window.server_cpu_s and window.frames:
        raw = window.server_cpu_s / window.frames * 1e6
        both = FloorStage("", libs + raw)
        lines.append(f"raw-echo in this run: {raw:.2f} us of server CPU per frame (its read, "
                     f"websockets' parser and a small write; {window.fps:,.0f} frames/s at "
                     f"{window.server_cpu_pct or 0:.0f}% of its core). "
                     f"The libraries plus that: {libs + raw:.2f} us per frame, "
                     f"**{both.calls_at(MAX_SERVER_CPU_PCT):,.0f} calls** in "
                     f"{MAX_SERVER_CPU_PCT:g}% of a core if everything of ours cost nothing.")
    ours = calls_run(runs, TELEPHONY_RUN)
    per_call = None if ours is None or ours.best is None else ours.best.cpu_pct_per_call
    if per_call:
        us = per_call / 100 * 1e6 / CALL_SECOND_FRAMES
        budget = MAX_SERVER_CPU_PCT / 100 * 1e6 / MIN_CALLS / CALL_SECOND_FRAMES
        lines.append(f"streamgate in this run: {us:.1f} us per frame ({per_call:.3f}% of the "
                     f"core per call), of which the libraries above are {libs:.1f}; "
                     f"{MIN_CALLS:,} calls in {MAX_SERVER_CPU_PCT:g}% of a core allow {budget:.0f} "
                     "us per frame for everything.")
    return lines


def issue15_table(runs: list[ServerRun]) -> list[str]:
    lines = ["| target | measured | peer / reference | met |", "|---|---|---|---|"]
    for t in issue15_targets(runs):
        met = "not measured" if t.met is None else "yes" if t.met else "**NO**"
        lines.append(f"| {t.what} | {t.measured} | {t.reference} | {met} |")
    return lines


def call_lines(cap: CallCapacity) -> list[str]:
    lines = [
        "| step | calls | audio accepted (calls' lives) | dropped ms | ingest lag p99 ms "
        "| ping RTT p50 / p99 ms | server CPU | per call | Redis+PG CPU "
        "| gen CPU / pacer lag ms | others on server / gen CPU "
        "| agent media / marks answered / clears | RSS MB | result |",
        "|---" * 14 + "|",
    ]
    for i, s in enumerate(cap.steps, 1):
        frac = s.accepted_fraction
        lag = "not measured" if s.lag_p99_ms is None else f"{s.lag_p99_ms:.2f}"
        verdict = "pass" if s.passed else f"fail: {s.why_not}"
        lines.append(
            f"| {i} | {s.opened}/{s.calls} | {'-' if frac is None else f'{100 * frac:.2f}%'} "
            f"| {'-' if s.dropped_ms is None else f'{s.dropped_ms:,.0f}'} | {lag} "
            f"| {s.rtt.p50_ms:.2f} / {s.rtt.p99_ms:.2f} "
            f"| {s.server_cpu_pct:.0f}% ({s.server_sys_pct:.0f}% sys) "
            f"| {s.cpu_pct_per_call or 0:.3f}% | {s.helpers_cpu_pct:.0f}% "
            f"| {s.gen_cpu_pct:.0f}% / {s.pacer_lag_ms:.1f} "
            f"| {s.others_on_server_cpu_pct:.0f}% / {s.others_on_gen_cpu_pct:.0f}% "
            f"| {s.media_in:,} / {s.marks_answered:,} / {s.clears:,} | {_mb(s.rss_kb)} "
            f"| {verdict} |")
    lines.append("")
    lines.append(f"Search: {len(cap.steps)} steps in {cap.elapsed_s:.0f} s; stopped: "
                 f"{cap.stopped}. **Most calls kept up with: {_calls(cap)}.**")
    per_call = cap.kib_per_call()
    at = cap.rss_step
    if per_call is not None and at is not None:
        lines.append(f"RSS per active call: **{per_call:,.0f} KiB** (at {at.opened} calls, "
                     f"VmRSS {at.rss_kb / 1024:.0f} MB vs {cap.rss_base_kb / 1024:.0f} MB "
                     "before the first call; the largest count kept up with before any larger "
                     "count ran).")
    best = cap.best
    if best is not None and best.opened:
        lines.append(f"CPU per call: **{best.cpu_pct_per_call or 0:.3f}% of one core = "
                     f"{1e4 * best.server_cpu_pct / best.opened:,.0f} us of CPU per "
                     f"call-second** (server process at {best.opened} calls).")
    if cap.total_accepted_ms is not None and cap.total_sent_ms > 0:
        lines.append(f"Whole search (every step, ramps and warm-ups included, after the last "
                     f"call hung up): {cap.total_sent_ms / 1000:,.0f} s of caller audio sent, "
                     f"{100 * cap.total_accepted_ms / cap.total_sent_ms:.2f}% accepted, "
                     + ("-" if cap.total_dropped_ms is None
                        else f"{cap.total_dropped_ms:,.0f} ms") + " dropped.")
    if not cap.lag_measured:
        lines.append("Ingest lag: **not measured** (the server exposes no lag histogram in "
                     "this run); the lag rule was not applied.")
    return lines


# --- tables --------------------------------------------------------------------------------------


def closed_loop_table(runs: list[ServerRun], shape: str) -> list[str]:
    with_rss = shape == "ack"  # the first run on each fresh server: its RSS says something
    head = "| server | conns | frames/s | p50 ms | p99 ms | max ms | server CPU | gen CPU |"
    cols = 8
    if with_rss:
        head += " RSS idle MB | RSS open MB | KiB/conn |"
        cols += 3
    lines = [head, "|---" * cols + "|"]
    for run in runs:
        if run.name not in CLOSED_LOOP_NAMES:
            continue
        r = run.ack if shape == "ack" else run.window
        if r is None:
            lines.append(f"| {run.name} | failed: {'; '.join(run.errors) or '-'} |"
                         + " |" * (cols - 2))
            continue
        lat = r.latency
        line = (f"| {run.name} | {r.opened}/{r.requested} | {r.fps:,.0f} | {lat.p50_ms:.2f} "
                f"| {lat.p99_ms:.2f} | {lat.max_ms:.1f} | {_cpu(r)} | {_pct(r.gen_cpu_pct)} |")
        if with_rss:
            per_conn = "-"
            if r.rss_idle_kb and r.rss_open_kb and r.opened:
                per_conn = f"{(r.rss_open_kb - r.rss_idle_kb) / r.opened:.1f}"
            line += f" {_mb(r.rss_idle_kb)} | {_mb(r.rss_open_kb)} | {per_conn} |"
        lines.append(line)
    return lines


def ratio_line(runs: list[ServerRun], shape: str) -> str:
    found = ratios(runs, shape)
    return "; ".join(f"**{k} = {v:.2f}**" for k, v in found.items())


def capacity_lines(cap: Capacity, billing: bool = True) -> list[str]:
    lines = [
        "| step | sessions | frames/s credited / due | p50 ms | p99 ms | max ms | server CPU "
        "| Redis+PG CPU | gen CPU / pacer lag ms | RSS MB | result |",
        "|---" * 11 + "|",
    ]
    for i, s in enumerate(cap.steps, 1):  # in the order run: RSS only grows
        r = s.result
        lat = r.latency
        verdict = "pass" if s.passed else f"fail: {s.why_not}"
        lines.append(
            f"| {i} | {s.sessions} | {r.fps:,.0f} / {r.target_fps or 0:,.0f} | {lat.p50_ms:.2f} "
            f"| {lat.p99_ms:.2f} | {lat.max_ms:.1f} | {_cpu(r)} | {_pct(r.helpers_cpu_pct)} "
            f"| {_pct(r.gen_cpu_pct)} / {r.max_sched_lag_ms:.1f} | {_mb(s.rss_kb)} | {verdict} |")
    lines.append("")
    best = cap.best
    lines.append(f"Search: {len(cap.steps)} steps in {cap.elapsed_s:.0f} s; stopped: "
                 f"{cap.stopped}. **Max sessions meeting p99 < {cap.p99_limit_ms:g} ms with "
                 f">= {100 * cap.min_acked:g}% of frames credited: "
                 f"{0 if best is None else best.sessions}.**")
    per_active = cap.kib_per_active_session()
    largest = cap.largest
    if per_active is not None and largest is not None:
        lines.append(f"RSS per active session: **{per_active:.0f} KiB** (at {largest.sessions} "
                     f"sessions, VmRSS {largest.rss_kb / 1024:.0f} MB vs "
                     f"{cap.rss_base_kb / 1024:.0f} MB before the first session).")
    cpu = None if best is None else cpu_per_session(best)
    if best is not None and cpu is not None:
        helpers = (f"; embedded Redis + PostgreSQL another "
                   f"{_pct(best.result.helpers_cpu_pct)} of the same core" if billing else "")
        lines.append(f"CPU per active session: **{cpu[0]:.3f}% of one core = {cpu[1]:.0f} us of "
                     f"CPU per session-second** (server process at {best.sessions} "
                     f"sessions{helpers}).")
    return lines


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def format_node_run(node: NodeRun) -> str:
    """One line for the console."""
    r, w = node.step.result, node.window
    sup = ("" if w.supervisor_cpu_s is None else
           f"; supervisor {_pct(node.pct(w.supervisor_cpu_s))} CPU, "
           f"{(w.supervisor_rss_kb or 0) / 1024:.0f} MB")
    return (f"--workers {node.workers}: {r.opened}/{node.sessions} sessions, p99 "
            f"{r.latency.p99_ms:.1f} ms, workers {_pct(node.pct(w.workers_cpu_s))} CPU = "
            f"{_us(node.cpu_us_per_session_s())} us per session-second{sup}; generator "
            f"{_pct(node.pct(w.generator_cpu_s))}; other processes "
            f"{_pct(node.pct(w.others_cpu_s))}")


def _node_row(node: NodeRun, label: str, pinned: bool) -> str:
    r, w = node.step.result, node.window
    where = ("1 pinned (generator on the other)" if node.workers == 1 and pinned
             else f"{w.cpus} shared with the generator" if pinned else f"{w.cpus} unpinned")
    sup = ("-" if w.supervisor_cpu_s is None else
           f"{node.pct(w.supervisor_cpu_s) or 0:.2f}% / {(w.supervisor_rss_kb or 0) / 1024:.0f}")
    sys_pct = node.pct(sum(x.sys_s for x in w.workers)) or 0
    return (f"| {label} | {where} | {r.opened}/{node.sessions} | {r.fps:,.0f} / "
            f"{r.target_fps or 0:,.0f} | {r.latency.p50_ms:.2f} | {r.latency.p99_ms:.2f} | "
            f"{_pct(node.pct(w.workers_cpu_s))} ({sys_pct:.0f}% sys) | "
            f"**{_us(node.cpu_us_per_session_s())}** | {_pct(node.pct(w.helpers_cpu_s))} | {sup} "
            f"| {_pct(node.pct(w.generator_cpu_s))} | {_pct(node.pct(w.others_cpu_s))} "
            f"| {_pct(node.pct(w.cpus_busy_s))} of {100 * w.cpus}% |")


def workers_lines(nodes: dict[int, NodeRun], half: NodeRun | None, pinned: bool) -> list[str]:
    lines = [
        "| workers | CPUs | sessions | frames/s credited / due | p50 ms | p99 ms | workers' CPU "
        "| us CPU per session-second | Redis+PG CPU | supervisor CPU / RSS MB | generator CPU "
        "| other processes | CPUs busy |",
        "|---" * 13 + "|",
    ]
    for count in sorted(nodes):
        lines.append(_node_row(nodes[count], str(count), pinned))
        if count == 1 and half is not None:
            lines.append(_node_row(half, "1, at half the sessions", pinned))
    lines.append("")
    for count in sorted(nodes):
        node = nodes[count]
        if count < 2:
            continue
        shares = []
        for x in node.window.workers:
            per = ("" if not x.sessions or node.window.seconds <= 0 else
                   f", {1e6 * x.cpu_s / (x.sessions * node.window.seconds):,.0f} us per "
                   "session-second")
            shares.append(f"pid {x.pid}: {x.sessions if x.sessions is not None else '?'} "
                          f"sessions, {_pct(node.pct(x.cpu_s))} of a core{per}")
        lines.append(f"Per worker (`--workers {count}`; sessions from its `/metrics` series, "
                     "as SO_REUSEPORT spread them): " + "; ".join(shares) + ".")
        lines.append("")
    one, two = nodes.get(1), nodes.get(2)
    ratio = None if one is None or two is None else efficiency(one, two)
    if ratio is not None and one is not None and two is not None:
        lines.append(
            f"**Per-core efficiency of two workers = {_us(one.cpu_us_per_session_s())} / "
            f"{_us(two.cpu_us_per_session_s())} = {ratio:.2f}x one worker's** (target >= "
            f"{MIN_WORKERS_EFFICIENCY:g}x): at this CPU per session, {count_per_core(one)} "
            f"sessions would fill one core with one worker, {count_per_core(two)} per core "
            f"with two.")
        at_half = None if half is None else efficiency(half, two)
        if at_half is not None and half is not None:
            lines.append(
                f"At the load each of the two workers carries ({half.sessions} sessions), one "
                f"worker costs {_us(half.cpu_us_per_session_s())} us per session-second: at "
                f"equal load per worker two workers are **{at_half:.2f}x** as efficient as one. "
                "That ratio is the cost of being two processes (the supervisor; both cores "
                "shared with the generator and the stores); the gap between it and the "
                "headline ratio is what a worker's lighter load costs (smaller engine batches, "
                "more event-loop wake-ups per frame).")
    return lines


def count_per_core(node: NodeRun) -> str:
    us = node.cpu_us_per_session_s()
    return "-" if not us else f"{1e6 / us:,.0f}"


def idle_lines(idle: IdleResult) -> list[str]:
    return [
        "| sessions open | settle | RSS before MB | RSS with sessions MB | KiB per idle session |",
        "|---|---|---|---|---|",
        f"| {idle.opened}/{idle.requested} | {idle.settle_s:g} s | "
        f"{idle.rss_before_kb / 1024:.1f} | {idle.rss_after_kb / 1024:.1f} | "
        f"**{idle.kib_per_session:.1f}** |",
    ]


def tts_lines(runs: list[TtfaRun]) -> list[str]:
    lines = [
        "| sessions | requests | gateway p50 / p99 ms | engine first chunk p50 / p99 ms "
        "| overhead p50 / p99 ms | engine first frame p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for t in runs:
        lines.append(
            f"| {t.concurrency} | {t.gateway.samples} | {t.gateway.p50_ms:.2f} / "
            f"{t.gateway.p99_ms:.2f} | {t.engine.p50_ms:.2f} / {t.engine.p99_ms:.2f} "
            f"| **{t.overhead_p50_ms:.2f} / {t.overhead_p99_ms:.2f}** "
            f"| {t.engine_frame.p50_ms:.2f} / {t.engine_frame.p99_ms:.2f} |")
    return lines


# --- observations --------------------------------------------------------------------------------


def _result_notes(r: RunResult, label: str) -> list[str]:
    out: list[str] = []
    if r.mode == "closed-loop" and r.server_cpu_pct is not None and r.server_cpu_pct < 90:
        out.append(
            f"{label}: NOT SERVER-BOUND: the server was only {r.server_cpu_pct:.0f}% busy "
            f"(generator {r.gen_cpu_pct:.0f}%, other processes on the generator's CPU "
            f"{r.others_on_gen_cpu_pct or 0:.0f}%): frames/s is a lower bound")
    if r.server_reads_per_frame is not None and r.server_writes_per_frame is not None:
        out.append(f"{label}: server syscalls per acked frame: {r.server_reads_per_frame:.2f} "
                   f"reads, {r.server_writes_per_frame:.2f} writes; event loop slept "
                   f"{r.server_sleeps_per_s or 0:,.0f} times/s")
    if r.helpers_cpu_pct:
        out.append(f"{label}: embedded Redis + PostgreSQL (and idle pocketsphinx workers) used "
                   f"{r.helpers_cpu_pct:.0f}% of the server's CPU on top of the server")
    if r.others_on_server_cpu_pct is not None:
        # Others on the server's CPU always cost throughput (on the generator's CPU only
        # when the server ends up waiting for the generator: see NOT SERVER-BOUND).
        others = max(0.0, r.others_on_server_cpu_pct - (r.helpers_cpu_pct or 0.0))
        shared = others > 5 or (r.steal_pct or 0) > 2
        out.append(f"{label}: other processes used {others:.0f}% of the server's CPU and "
                   f"{r.others_on_gen_cpu_pct or 0:.0f}% of the generator's; steal "
                   f"{r.steal_pct or 0:.0f}%" + (" - SHARED CPU, numbers depressed"
                                                    if shared else ""))
    if r.connect_failures:
        out.append(f"{label}: connect failures: {r.connect_failures}")
    if r.server_closes:
        out.append(f"{label}: server-initiated closes: {r.server_closes}")
    if r.dropped:
        out.append(f"{label}: connections dropped without a close handshake: {r.dropped}")
    if r.aborted_at_close:
        out.append(f"{label}: connections not closed within 5 s of our close frame: "
                   f"{r.aborted_at_close}")
    if r.text_types:
        out.append(f"{label}: other server messages: {dict(sorted(r.text_types.items()))}")
    out.extend(f"{label}: server said: {sample}" for sample in r.samples[:3])
    return out


def _node_notes(node: NodeRun) -> list[str]:
    label = f"{node.sessions} real-time sessions"
    out = [f"{label}: {why}" for why in node.problems()]
    if not node.step.passed:
        out.append(f"{label}: NOT BELOW SATURATION ({node.step.why_not}): the comparison is "
                   "not between two comfortable nodes")
    r = node.step.result
    if r.server_reads_per_frame is not None:
        out.append(f"{label}: workers' syscalls per credited frame: "
                   f"{r.server_reads_per_frame:.2f} reads, {r.server_writes_per_frame or 0:.2f} "
                   f"writes; event loops slept {r.server_sleeps_per_s or 0:.0f} times/s")
    others = node.pct(node.window.others_cpu_s)
    if others is not None and others >= 10.0:
        out.append(f"{label}: other processes took {others:.0f}% of a core on the run's CPUs - "
                   "SHARED CPU, numbers noisy")
    steal = node.pct(node.window.steal_s)
    if steal is not None and steal >= 1.0:
        out.append(f"{label}: steal {steal:.0f}%")
    if r.text_types:
        out.append(f"{label}: other server messages: {dict(sorted(r.text_types.items()))}")
    return out


def _health_notes(h: Health) -> list[str]:
    out = [f"problem: {p}" for p in h.problems()]
    out.extend(f"log x{count}: {msg}" for msg, count in h.log_messages)
    out.extend(f"stderr: {line}" for line in h.raw_lines[:10])
    if h.metrics:
        sessions = {f"{_labels(k).get('kind', '?')} {_labels(k).get('code', '?')}": int(v)
                    for k, v in h.metrics.items() if k.startswith("streamgate_sessions_total")}
        if sessions:
            out.append(f"sessions ended, by kind and close code (server metric): {sessions}")
        batches = h.metrics.get('streamgate_engine_batch_size_count{model="synthetic"}')
        items = h.metrics.get('streamgate_engine_batch_size_sum{model="synthetic"}')
        if batches:
            out.append(f"engine batches: {batches:.0f}, mean size {(items or 0) / batches:.1f}")
        for key, value in h.metrics.items():
            if key.startswith(("streamgate_upgrades_rejected", "streamgate_engine_errors",
                               "streamgate_audio_dropped")) and value:
                out.append(f"{key} = {value:g}")
    return out


def notes_for(run: ServerRun) -> list[str]:
    out = [f"error: {e}" for e in run.errors]
    if run.ack is not None:
        out += _result_notes(run.ack, "ack per frame")
    if run.window is not None:
        out += _result_notes(run.window, f"window of {run.window.inflight}")
    if run.capacity is not None and run.capacity.best is not None:
        out += _result_notes(run.capacity.best.result,
                             f"real time at {run.capacity.best.sessions} sessions")
    for node in run.nodes:
        out += _node_notes(node)
    if run.calls is not None:
        for step in run.calls.steps:
            shared = step.others_on_server_cpu_pct > 5 or step.others_on_gen_cpu_pct > 10
            out.append(f"{step.calls} calls: other processes used "
                       f"{step.others_on_server_cpu_pct:.0f}% of the server's CPU and "
                       f"{step.others_on_gen_cpu_pct:.0f}% of the generator's"
                       + (" - SHARED CPU, numbers depressed" if shared else ""))
            if step.connect_failures:
                out.append(f"{step.calls} calls: connect failures: {step.connect_failures}")
    if run.balances is not None:
        before, after = run.balances
        note = (f"billing: the bench tenant's balance in PostgreSQL went down by "
                f"{before.balance_micros - after.balance_micros:,} micros (usage flushed so far)")
        if after.spendable_micros is not None:
            note += f"; spendable in the Redis wallet: {after.spendable_micros:,} micros"
        out.append(note)
    return out + _health_notes(run.health)


# --- the document --------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = []
    for pkg in ("websockets", "uvloop", "numpy", "soxr", "webrtcvad-wheels", "msgspec",
                "redis", "asyncpg"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{pkg} {metadata.version(pkg)}")
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "mem": f"{mem_kb / 1024 / 1024:.1f} GiB RAM" if mem_kb else "? RAM",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": ", ".join(versions),
    }


def result_sections(args: argparse.Namespace, runs: list[ServerRun]) -> list[str]:
    """Everything measured: printed at the end of a run and written into the document."""
    lines = ["### Targets (issue 15)", "",
             "Every number is from this one run; the server on one core, the generator on the",
             "other. Calls per core: the most concurrent Twilio calls meeting every keep-up rule",
             "(the tables below show each step and what failed).", "",
             *issue15_table(runs), "",
             "### Other targets (issues 5 and 13)", "",
             "Throughput is judged on the window shape (the headline table below); the ack per",
             "frame table is the worst case.", "",
             *goals_table(runs), ""]
    floor: list[FloorStage] | None = getattr(args, "call_floor", None)
    if floor:
        lines += ["### The floor under a call (issue 15, target 1)", "",
                  "`python -m loadtest.call_floor`, in the bench process after the servers: what",
                  "the libraries a call's inbound audio goes through cost per 20 ms `media` frame",
                  "with nothing of ours between them (no socket, agent, TTS, marks, billing or",
                  "metrics): a lower bound.", "", *floor_lines(runs, floor), ""]
    for name, title in ((TELEPHONY_RUN, "streamgate `/v1/telephony/twilio`"),
                        (PEER_RUN, "Pipecat 1.14 (FastAPI websocket, TwilioFrameSerializer, "
                                   "Silero VAD, stub STT)")):
        calls = calls_run(runs, name)
        if calls is not None:
            lines += [f"### Twilio calls per core: {title}", "",
                      f"Ingest lag: {calls.lag_what}; limit p99 < {calls.lag_limit_ms:g} ms.", "",
                      *call_lines(calls), ""]
    if shape_fps(runs, "window"):
        lines += [f"### Closed loop, window of {args.window} frames (headline throughput)", "",
                  *closed_loop_table(runs, "window"), "",
                  "Ratios (same run): " + ratio_line(runs, "window"), ""]
    if shape_fps(runs, "ack"):
        lines += ["### Closed loop, ack per frame (worst case: one frame in flight)", "",
                  *closed_loop_table(runs, "ack"), "",
                  "Ratios (same run): " + ratio_line(runs, "ack"), ""]
    cap = capacity_run(runs)
    if cap is not None:
        lines += ["### Real-time sessions: max concurrent with p99 frame-to-credit "
                  f"< {cap.p99_limit_ms:g} ms", "", *capacity_lines(cap), ""]
    ceiling = capacity_run(runs, REALTIME_CEILING)
    if ceiling is not None:
        lines += ["### Real-time ceiling: raw-echo under the same search", "",
                  "The same sessions against raw-echo (a text ack per frame, counted as one "
                  "frame of credit):",
                  "what a server of this design holds on this machine doing no work at all.", "",
                  *capacity_lines(ceiling, billing=False), ""]
        if (cap is not None and cap.best is not None and ceiling.best is not None
                and ceiling.best is not ceiling.largest):  # the ceiling was found, not bounded
            lines += [f"Ratio (same run): **streamgate / raw-echo real-time sessions = "
                      f"{cap.best.sessions / ceiling.best.sessions:.2f}**", ""]
    nodes = node_runs(runs)
    if nodes:
        lines += ["### `--workers 2` beside `--workers 1`: CPU per real-time session", "",
                  *workers_lines(nodes, half_load_run(runs), args.pinned), ""]
    idle = idle_run(runs)
    if idle is not None:
        lines += ["### Memory per idle session", "", *idle_lines(idle), ""]
    tts = tts_runs(runs)
    if tts:
        lines += ["### TTS time to first audio (`flush` -> first audio frame)", "",
                  *tts_lines(tts), "",
                  "Gateway and engine are separate runs: the overhead is a difference of",
                  "percentiles, and with 100-200 requests a p99 is one of the two slowest, so",
                  "one hiccup on either side moves it. Gateway minus \"engine first frame\" is",
                  "the overhead beyond waiting for a whole first frame of audio.", ""]
    return lines


def observation_lines(runs: list[ServerRun]) -> list[str]:
    return [f"- {run.name}: {note}" for run in runs for note in notes_for(run)]


def render_markdown(
    args: argparse.Namespace, command: str, started: datetime, runs: list[ServerRun],
    asr_path: str, tts_path: str, tts_first_audio_ms: float,
) -> str:
    mi = machine_info()
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m loadtest.bench` (`make bench`); every run overwrites this file.",
        "One command, one process tree, one run: each server is started fresh, alone, pinned",
        "to one CPU, and the load generator (raw asyncio Protocols on uvloop, hand-built masked",
        "frames, this process) is pinned to the other CPU; everything goes over 127.0.0.1.",
        "The exception is the `--workers 2` node, which shares both CPUs with the generator.",
        "",
        "## What is measured",
        "",
        "**Servers.**",
        "",
        "- **ws-echo**: websockets' asyncio server (`websockets.asyncio.server.serve`, uvloop),",
        "  a handler task per connection answering each binary frame with a small text frame.",
        "- **raw-echo**: asyncio.Protocol + websockets' sans-I/O `ServerProtocol` (uvloop), the",
        "  ack written inline in `data_received`: the ceiling for streamgate's design.",
        "- **streamgate**: `python -m server serve` with the full ASR ingest path on",
        f"  `{asr_path}`",
        "  (mu-law decode, webrtcvad at 8 kHz, utterance tracking, speech resampled to 16 kHz",
        "  with soxr, the synthetic engine through the micro-batcher: 5 ms + 0.5 ms/item,",
        "  batches of up to 32) **with billing on**: the server starts its own embedded Redis",
        "  and PostgreSQL (fresh, in a temporary directory, as children of the server process",
        "  and so on the server's CPU too), and",
        "  the bench creates a funded tenant through the admin API with limits no run reaches",
        "  (tenant limits live in PostgreSQL; the dev tenant's defaults would cap the bench at",
        "  100 sessions). Every session authenticates with that tenant's API key",
        "  (`Authorization: Bearer`), passes the per-key rate limit and the concurrent-session",
        "  count in Redis, takes a lease from the wallet, reports usage every 5 s and settles",
        "  at close. The config sets `asr.session.ingest_queue_ms = 80` (credit window 640",
        "  bytes = 4 frames; `credit` comes back for every 20 ms frame drained),",
        "  `logging.level = \"WARNING\"`, `server.idle_timeout_s = 60`. Server CPU is the",
        "  server process; Redis + PostgreSQL CPU is reported beside it.",
        "- **streamgate-telephony**: the same server and billing on `/v1/telephony/twilio`, the",
        "  full call path: Twilio JSON + base64 decode, G.711 mu-law, webrtcvad, utterances",
        "  resampled to 16 kHz, engine feeds, the echo agent's replies spoken through the",
        "  synthetic TTS and sent back as `media` paced by `mark`s, barge-in `clear`s; the key",
        "  in `start.customParameters.api_key`, every call admitted, leased and metered like a",
        "  session. Two config changes from the server above: the synthetic ASR engine's batch",
        "  capacity is made effectively unlimited (latency 5 ms per batch, batches of up to",
        "  4096; the default one models a GPU of ~1,500 feeds/s, which a few hundred calls",
        "  saturate: its queue would then drop caller audio and the bench would measure the",
        "  engine), and the default ingest queue (a call grants no credit).",
        "- **pipecat-telephony** (the peer): Pipecat 1.14 from a bench-only virtualenv",
        "  (`.venv-bench-pipecat`, pinned in `loadtest/pipecat_peer/requirements.txt`, built by",
        "  `make bench`), `loadtest/pipecat_peer/server.py` on uvicorn + uvloop: per call the",
        "  pipeline of Pipecat's Twilio examples, `FastAPIWebsocketTransport` with",
        "  `TwilioFrameSerializer` -> `VADProcessor(SileroVADAnalyzer)` -> a stub STT -> an",
        "  echo that answers each transcript with 1 s of pre-rendered audio -> the transport's",
        "  output (`media` at real-time pace). The stub STT consumes the audio and, for every",
        "  frame, records the time from its read (the serializer stamps it as it decodes the",
        "  `media` message) to its arrival there; it emits a transcript when Silero ends an",
        "  utterance. Pipecat reads no key (no billing) and sends no marks; it logs at WARNING",
        "  as streamgate does.",
        "",
        "**Twilio calls per core (issue 15).** The load a phone provider puts on a server, from",
        "the same generator for both servers (`loadtest/twilio_calls.py`: raw asyncio Protocols",
        "on uvloop, masked text frames built by hand): per call a WebSocket upgrade, `connected`,",
        "`start`, then one `media` JSON text frame (20 ms of base64 mu-law from the speech loop",
        "below) every 20 ms, calls spread over the 20 ms; agent `media` is \"played\" in real time",
        "and each `mark` answered when the audio before it has played (at once after a `clear`),",
        "as Twilio does; every call sends a WebSocket ping each second and times the pong. The",
        "search tries counts like the real-time search below",
        f"(`--calls-step` {args.calls_step} for streamgate, `--peer-step` {args.peer_step} for",
        "Pipecat, then bisection), each with fresh calls: they connect evenly over",
        "`--calls-ramp`, stream through `--calls-warmup` and a measured window of",
        f"`--calls-seconds` ({args.calls_seconds:g} s), then all hang up (`stop`, close); the next",
        "count starts once the server holds no call. A count is kept up with when every call",
        "connected and none was lost; over the calls' whole lives, no audio was dropped",
        "(`streamgate_audio_dropped_ms_total`) and >= 99.9% of the audio sent was accepted",
        "(`streamgate_audio_accepted_ms_total`, read before the first call and after the last",
        "one ended: a call publishes these with each 5 s usage report and at its end, so only",
        "then are they exact; for Pipecat, the audio that reached its STT stage, so audio",
        "still queued when the calls hang up counts as not accepted); and inside the window,",
        "server CPU <= 90% of its core, p99 ingest lag under the limit and ping RTT p99 < 50",
        "ms. Ingest lag for streamgate is its own histogram",
        "`streamgate_ingest_lag_seconds{kind=\"telephony\"}` (a frame's read from the socket to",
        "its pass through the VAD; one observation per ingest step, the oldest frame's), diffed",
        "around the window, p99 interpolated in its bucket, limit 20 ms; for Pipecat, read ->",
        "its STT stage, limit 200 ms (its queues are unbounded: overload shows as lag, never as",
        "drops). A rule a server cannot report is \"not measured\", never assumed. RSS per active",
        "call: VmRSS growth from before the first call to the largest count kept up with while",
        "the counts only grew (no larger count's memory in the allocator yet), per call. The",
        "\"others\" column is the CPU other processes took on the server's and the generator's",
        "CPUs during the window (/proc/stat; this machine is shared).",
        "",
        f"**Frames.** {FRAME_BYTES} bytes = {FRAME_MS} ms of 8 kHz mu-law. The audio"
        f" (`--signal {args.signal}`)",
        "is a 2.4 s loop: 1.6 s of synthetic voiced syllables, 0.8 s of low noise; webrtcvad",
        "calls it speech, so streamgate runs onset, engine feeds, endpointing and one final",
        "per loop.",
        "",
        "**Throughput (closed loop).** N connections each keep frames in flight and send more",
        "as they are acknowledged; frames acknowledged per second over the window. Echo servers",
        "acknowledge each frame with a text frame; streamgate returns `credit` (bytes). Two",
        f"shapes: **window** (each connection keeps {args.window} frames in flight, within its",
        "credit: how a credit-based client really streams) is the **headline** and the one the",
        "throughput targets are judged on; **ack per frame** (one frame in flight, the next",
        "sent on its ack) is kept as the worst case. Latency is per frame, send to ack.",
        "",
        "**Real-time capacity.** Sessions that each send one frame every 20 ms (phases spread",
        "over the 20 ms), never beyond their credit. A bounded search on one set of sessions",
        "that grows and shrinks: `--rt-step` sessions at a time, then bisection down to",
        "`--rt-resolution`; a step's new sessions connect evenly over `--rt-ramp` (5 s, the",
        "usage report interval: sessions opened together would report usage together every",
        "5 s for as long as they live, a burst real traffic does not have), then a warm-up, then",
        "the measured window. The answer is the largest count whose p99 frame-to-credit (a",
        "frame's send -> the credit returning its bytes; a frame that waited for credit counts",
        f"from its scheduled time) is under {P99_LIMIT_MS:g} ms, with >= 99% of the frames due",
        "credited and no session lost. The generator's own lateness (\"pacer lag\", the most a",
        "frame went out late) is not counted but shown; a failing step with the generator near",
        "a full core is marked GENERATOR-BOUND?. RSS per active session: VmRSS growth from",
        "before the first session to the largest count measured, per session. CPU per active",
        "session: server CPU / sessions at the largest passing count.",
        "",
        "**Real-time ceiling.** The same search against a fresh raw-echo, whose text ack per",
        "frame counts as one frame of credit (a 4-frame window, like streamgate's): the most",
        "real-time sessions a server of this design holds on this machine doing no work at",
        "all. Per frame it pays what streamgate pays at least: one read, one write (on",
        "loopback the write also runs the generator's TCP receive path), its share of an",
        "epoll wake-up, and websockets' frame parser.",
        "",
        "**`--workers 2` beside `--workers 1`** (issue 13; docs/decisions/13H1-workers-bench.md).",
        f"The same {args.workers_sessions} real-time sessions (as above: a 20 ms frame every",
        f"20 ms, new sessions over {args.rt_ramp:g} s, {args.rt_warmup:g} s warm-up) measured for",
        f"the same {args.workers_seconds:g} s against a fresh `serve --workers 1`, pinned to one",
        "CPU with the generator on the other, and a fresh `serve --workers 2`, not pinned: the",
        "supervisor, its",
        "two workers, the embedded stores and the generator share both CPUs as on a real node.",
        "The started process execs the supervisor in place, so its pid is the supervisor's; the",
        "workers are its children running `server.supervisor.worker`, every other descendant",
        "(Redis, PostgreSQL) is a store. CPU comes from /proc per process: workers' CPU per",
        "session-second (the node's total over all sessions; per worker with the sessions its",
        "`/metrics` series shows), the supervisor's CPU and RSS, the stores', the generator's,",
        "and \"other processes\" (the CPUs' busy time from /proc/stat, irq and softirq included,",
        "minus all of ours: other jobs on a shared machine). Efficiency = CPU per session-second",
        "with one worker / with two (>= 0.9 is issue 13's target): the same N means each of two",
        "workers carries N/2, so the one-worker server is also measured at N/2 (after closing",
        "half its sessions): at equal load per worker, what is left is the cost of being two",
        "processes.",
        "",
        "**Idle sessions.** `--idle-sessions` sessions opened to `ready` on a fresh server, no",
        "audio; after 2 s, the VmRSS growth per session.",
        "",
        f"**TTS time to first audio.** `{tts_path}`, the synthetic TTS engine with a fixed",
        f"{tts_first_audio_ms:g} ms to its first chunk (40 ms chunks, real-time factor 0.05).",
        f"A session sends `text` (\"{TTS_TEXT}\") + `flush`; TTFA is the time to the first",
        "binary audio frame; the client returns credit for every frame and sends the next",
        "request after `flushed` (first request per session not counted). The engine's own",
        "TTFA: the same synthesizer class with the same config in the bench process, the same",
        "text and concurrency, from `synthesize()` to its first chunk. Overhead = gateway -",
        "engine, percentile by percentile. The gateway sends audio in frames of",
        "`tts.session.chunk_ms` (100 ms): the engine's time to its first 100 ms of audio is in",
        "the last column, to tell framing from the rest of the overhead.",
        "",
        "**Reading the numbers.** A small shared machine: absolute numbers move between runs",
        "by 10-20%; ratios measured in the same run are what count. The observations say how",
        "much of the pinned CPUs other processes took (\"SHARED CPU\" when it was more than a",
        "few percent) and flag a closed loop where the server was not saturated (\"NOT",
        "SERVER-BOUND\"). RSS is the server process only (not Redis, PostgreSQL, or the two",
        "idle pocketsphinx workers that config/default.toml's `sphinx-en` model starts).",
        "",
        "**RSS after idle sessions end** is not part of this run: `python -m loadtest.idle_churn`",
        "measures it, and docs/memory.md holds its last run and where the memory stays (allocator",
        "high-water mark, bounded by the peak number of concurrent sessions, ~37 KiB each; no",
        "Python object survives).",
        "",
        "## Latest run",
        "",
        f"- Command: `{command}`",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- Machine: {mi['nproc']} CPUs, {mi['cpu']}, {mi['mem']}, Linux {mi['kernel']}",
        f"- Python {mi['python']}; {mi['packages']}",
        f"- Closed loops: {args.connections} connections (opened {args.batch} at a time), "
        f"warm-up {args.warmup:g} s, measured {args.seconds:g} s; real time: steps of "
        f"{args.rt_step} (new sessions over {args.rt_ramp:g} s), warm-up {args.rt_warmup:g} s, "
        f"measured {args.rt_seconds:g} s, budget {args.rt_budget:g} s; "
        + (f"server on CPU {args.server_cpu}, generator on CPU {args.client_cpu}"
           if args.pinned else "unpinned (fewer than 2 CPUs available)")
        + f"; `--workers 2` beside `--workers 1`: {args.workers_sessions} sessions, measured "
        f"{args.workers_seconds:g} s; Twilio calls: steps of {args.calls_step} (Pipecat "
        f"{args.peer_step}), new calls over {args.calls_ramp:g} s, warm-up "
        f"{args.calls_warmup:g} s, measured {args.calls_seconds:g} s, budget "
        f"{args.calls_budget:g} s per server",
        f"- Audio signal: `{args.signal}`",
        "",
        *result_sections(args, runs),
    ]
    notes = observation_lines(runs)
    if notes:
        lines += ["### Observations", "", *notes, ""]
    return "\n".join(lines)
