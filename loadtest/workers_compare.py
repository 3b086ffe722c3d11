"""`--workers 2` beside `--workers 1` (issue 13): the same N real-time sessions for the same
time against each, CPU per session-second from /proc, and the supervisor's own cost.

`--workers 1` runs as every other streamgate run of the bench: pinned to one CPU, the generator
on the other. `--workers 2` is not pinned inside the bench's two CPUs: the supervisor, both
workers, the embedded stores and the generator share both, as they would on a real node. The
comparison is CPU time, not latency: a worker's CPU seconds per session-second do not depend on
whether it waited for a core, only on the work it did (and on what sharing a core costs it in
caches and context switches, which is part of what is measured).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from loadtest.capacity import CapacitySearch, Step
from loadtest.node_probe import NodeProbe, NodeWindow

# streamgate_sessions_active{kind="asr",pid="123"} 97.0: one series per live worker (13A2).
_SESSIONS_BY_PID = re.compile(
    r'^streamgate_sessions_active\{[^}]*kind="asr"[^}]*pid="(\d+)"[^}]*\}\s+([0-9.eE+-]+)$'
    r'|^streamgate_sessions_active\{[^}]*pid="(\d+)"[^}]*kind="asr"[^}]*\}\s+([0-9.eE+-]+)$')

Scrape = Callable[[], Awaitable[str]]


@dataclass
class NodeRun:
    """N real-time sessions against one node of `workers` workers."""

    workers: int
    sessions: int
    step: Step
    window: NodeWindow

    def cpu_us_per_session_s(self) -> float | None:
        """The workers' CPU per session-second, in microseconds (the node's total: a session
        costs this much CPU wherever the kernel put it)."""
        w = self.window
        if not self.step.result.opened or w.seconds <= 0:
            return None
        return 1e6 * w.workers_cpu_s / (self.step.result.opened * w.seconds)

    def pct(self, cpu_s: float | None) -> float | None:
        """CPU seconds over the window as % of one core."""
        if cpu_s is None or self.window.seconds <= 0:
            return None
        return 100.0 * cpu_s / self.window.seconds

    def problems(self) -> list[str]:
        r = self.step.result
        out = []
        if r.opened < self.sessions:
            out.append(f"{self.sessions - r.opened} of {self.sessions} sessions did not open")
        lost = r.dropped + sum(r.server_closes.values())
        if lost:
            out.append(f"{lost} sessions lost")
        if self.window.restarted:
            out.append(f"workers came or went during the window: {self.window.restarted}")
        if len(self.window.workers) != self.workers:
            out.append(f"{len(self.window.workers)} workers measured, {self.workers} expected")
        return out


def sessions_by_pid(metrics_text: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for line in metrics_text.splitlines():
        m = _SESSIONS_BY_PID.match(line.strip())
        if m:
            pid, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            out[int(pid)] = int(float(value))
    return out


def efficiency(one: NodeRun, two: NodeRun) -> float | None:
    """(CPU per session-second with one worker) / (with two): 1.0 = a second worker does a
    session's work for the same CPU, so two cores carry twice the sessions of one."""
    a, b = one.cpu_us_per_session_s(), two.cpu_us_per_session_s()
    return None if a is None or not b else a / b


async def measure_node(search: CapacitySearch, probe: NodeProbe, workers: int,
                       counts: list[int], scrape: Scrape | None) -> list[NodeRun]:
    """Real-time sessions, one measured window per count, each split by process. With several
    workers, /metrics says how SO_REUSEPORT spread the sessions over them."""
    found: list[NodeRun] = []

    async def split(step: Step) -> None:
        window = probe.last_window()  # before anything else samples the probe
        by_pid = sessions_by_pid(await scrape()) if scrape is not None else {}
        for share in window.workers:
            share.sessions = by_pid.get(share.pid)
        if workers == 1 and window.workers:
            window.workers[0].sessions = step.result.opened
        found.append(NodeRun(workers, step.sessions, step, window))

    await search.measure_counts(counts, split)
    return found
