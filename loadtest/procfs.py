"""What the bench reads about processes and CPUs from /proc (Linux): CPU seconds, RSS, process
trees, per-CPU busy time. A process that is gone reads as zeros / None, never an exception:
a server's child may exit between a listing and a read."""

from __future__ import annotations

import contextlib
import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after "pid (comm)": [state, ppid, ...]; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> dict[int, str]:
    """Every descendant of `root`: pid -> its start time (to tell a reused pid)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = proc_stat(int(entry.name))
                if fields is not None:
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
                    starts[int(entry.name)] = fields[19]
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for kid in children.get(todo.pop(), []):
            found[kid] = starts[kid]
            todo.append(kid)
    return found


def children_of(parent: int) -> list[int]:
    """The direct children of `parent` (the workers of a supervisor, its stores)."""
    out = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = proc_stat(int(entry.name))
                if fields is not None and int(fields[1]) == parent:
                    out.append(int(entry.name))
    return sorted(out)


def cpu_seconds(pid: int, clk_tck: int = CLK_TCK) -> tuple[float, float]:
    """(user, system) seconds of one process (every thread); (0, 0) if it is gone."""
    fields = proc_stat(pid)
    if fields is None:
        return 0.0, 0.0
    return int(fields[11]) / clk_tck, int(fields[12]) / clk_tck


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def rss_kb(pid: int) -> int:
    """VmRSS of one process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def syscall_counts(pid: int) -> tuple[int, int, int]:
    """(read-type syscalls, write-type syscalls, voluntary context switches) of one process."""
    reads = writes = sleeps = 0
    with contextlib.suppress(OSError, KeyError, ValueError):
        with open(f"/proc/{pid}/io") as fh:
            io = dict(line.split(":", 1) for line in fh if ":" in line)
        reads, writes = int(io["syscr"]), int(io["syscw"])
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("voluntary_ctxt_switches:"):
                    sleeps = int(line.split()[1])
    return reads, writes, sleeps


def cpu_stat() -> dict[int, tuple[float, float]]:
    """Per CPU from /proc/stat: (user + nice + system seconds, steal seconds)."""
    out: dict[int, tuple[float, float]] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat") as fh:
            for line in fh:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                f = line.split()
                out[int(f[0][3:])] = ((int(f[1]) + int(f[2]) + int(f[3])) / CLK_TCK,
                                      int(f[8]) / CLK_TCK)
    return out


def cpus_busy_s(cpus: set[int]) -> tuple[float, float]:
    """(busy, steal) seconds summed over `cpus` from /proc/stat. Busy counts user, nice, system,
    irq and softirq: a process's system time includes the softirq work (loopback TCP) that ran
    on its behalf, which /proc/stat books apart, so leaving it out would make the processes we
    know about add up to more than the CPUs did."""
    busy = steal = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat") as fh:
            for line in fh:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                f = line.split()
                if int(f[0][3:]) in cpus:
                    busy += sum(int(v) for v in (f[1], f[2], f[3], f[6], f[7])) / CLK_TCK
                    steal += int(f[8]) / CLK_TCK
    return busy, steal
