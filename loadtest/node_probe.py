"""The processes of one streamgate node, measured from /proc while it carries load.

`streamgate serve --workers 1` is one process: it is the node's only worker and there is no
supervisor. `--workers N` (N > 1) execs the supervisor in place of the started process, so the
pid the bench started is the supervisor's; its workers are its children running
`server.supervisor.worker`; every other descendant (the embedded Redis and PostgreSQL the
supervisor starts, a worker's pocketsphinx helpers) is a helper.

NodeProbe implements loadgen.ServerProbe (the capacity step's server CPU is then the workers'
CPU, summed) and keeps every snapshot, so the bench can split the measured window by process:
each worker, the supervisor, the helpers, the generator (this process) and whatever else ran on
the CPUs the run could use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loadtest.loadgen import ProbeSample
from loadtest.procfs import (
    children_of,
    cmdline,
    cpu_seconds,
    cpus_busy_s,
    descendants,
    rss_kb,
    syscall_counts,
)

WORKER_MODULE = "server.supervisor.worker"


@dataclass(frozen=True)
class NodeSnapshot:
    """Cumulative counters of every process of the node, and of the CPUs, at one moment."""

    at: float  # perf_counter
    workers: dict[int, tuple[float, float]]  # pid -> (user, system) seconds
    supervisor_s: float  # 0 when there is no supervisor (--workers 1)
    supervisor_rss_kb: int
    helpers_s: float
    generator_s: float  # this process (user + system)
    cpus_busy_s: float  # every task on the CPUs the run may use
    cpus_steal_s: float


@dataclass
class WorkerShare:
    """One worker over a measured window."""

    pid: int
    cpu_s: float
    sys_s: float
    sessions: int | None = None  # live sessions it held (its /metrics series), if known


@dataclass
class NodeWindow:
    """The node's processes over one measured window: CPU seconds each, and the CPUs' total."""

    seconds: float
    workers: list[WorkerShare]
    supervisor_cpu_s: float | None  # None: no supervisor (--workers 1)
    supervisor_rss_kb: int | None
    helpers_cpu_s: float
    generator_cpu_s: float
    cpus: int  # how many CPUs the run could use
    cpus_busy_s: float
    steal_s: float
    restarted: list[int] = field(default_factory=list)  # worker pids not there all the window

    @property
    def workers_cpu_s(self) -> float:
        return sum(w.cpu_s for w in self.workers)

    @property
    def others_cpu_s(self) -> float:
        """CPU the run's CPUs spent on processes not ours (other jobs on a shared machine)."""
        ours = (self.workers_cpu_s + (self.supervisor_cpu_s or 0.0) + self.helpers_cpu_s
                + self.generator_cpu_s)
        return max(0.0, self.cpus_busy_s - ours)


class NodeProbe:
    """loadgen.ServerProbe over a node: the server CPU it reports is its workers' CPU."""

    def __init__(self, pid: int, supervised: bool, cpus: set[int]) -> None:
        self.pid = pid  # what the bench started: the supervisor, or the only worker
        self.supervised = supervised
        self.cpus = cpus
        self.snapshots: list[NodeSnapshot] = []

    def worker_pids(self) -> list[int]:
        if not self.supervised:
            return [self.pid]
        return [pid for pid in children_of(self.pid) if WORKER_MODULE in cmdline(pid)]

    def snapshot(self) -> NodeSnapshot:
        workers = self.worker_pids()
        ours = {self.pid, *workers}
        helpers = sum(sum(cpu_seconds(pid)) for pid in descendants(self.pid) if pid not in ours)
        busy, steal = cpus_busy_s(self.cpus)
        own = time.process_time()
        snap = NodeSnapshot(
            at=time.perf_counter(),
            workers={pid: cpu_seconds(pid) for pid in workers},
            supervisor_s=sum(cpu_seconds(self.pid)) if self.supervised else 0.0,
            supervisor_rss_kb=rss_kb(self.pid) if self.supervised else 0,
            helpers_s=helpers, generator_s=own, cpus_busy_s=busy, cpus_steal_s=steal)
        self.snapshots.append(snap)
        return snap

    # --- loadgen.ServerProbe ---

    def sample(self) -> ProbeSample:
        snap = self.snapshot()
        reads = writes = sleeps = 0
        for pid in snap.workers:
            r, w, s = syscall_counts(pid)
            reads, writes, sleeps = reads + r, writes + w, sleeps + s
        return ProbeSample(
            user_s=sum(u for u, _ in snap.workers.values()),
            sys_s=sum(s for _, s in snap.workers.values()),
            reads=reads, writes=writes, sleeps=sleeps, helpers_s=snap.helpers_s)

    def rss_kb(self) -> int:
        """The workers' RSS, summed (what carries the sessions)."""
        return sum(rss_kb(pid) for pid in self.worker_pids())

    def last_window(self) -> NodeWindow:
        """Between the last two snapshots (a capacity step samples right before and right
        after its measured window)."""
        a, b = self.snapshots[-2], self.snapshots[-1]
        workers = [WorkerShare(pid, sum(b.workers[pid]) - sum(a.workers[pid]),
                               b.workers[pid][1] - a.workers[pid][1])
                   for pid in sorted(b.workers) if pid in a.workers]
        restarted = sorted(set(a.workers) ^ set(b.workers))
        return NodeWindow(
            seconds=b.at - a.at, workers=workers,
            supervisor_cpu_s=b.supervisor_s - a.supervisor_s if self.supervised else None,
            supervisor_rss_kb=b.supervisor_rss_kb if self.supervised else None,
            # A helper that exited inside the window takes its CPU time with it: clamp.
            helpers_cpu_s=max(0.0, b.helpers_s - a.helpers_s),
            generator_cpu_s=b.generator_s - a.generator_s, cpus=len(self.cpus),
            cpus_busy_s=b.cpus_busy_s - a.cpus_busy_s, steal_s=b.cpus_steal_s - a.cpus_steal_s,
            restarted=restarted)
