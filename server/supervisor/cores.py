"""How many workers `streamgate serve` runs when not told: one per core this process may use."""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a cpuset or `taskset`), not the
    machine's: a container limited to 2 of 32 cores gets 2 workers."""
    counter = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if counter is not None:
        count: int | None = counter()
    elif hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    else:
        count = os.cpu_count()
    return max(1, count or 1)


def worker_count(requested: int | None, configured: int) -> int:
    """`--workers` if given, else `server.workers` if set (> 0), else one per available core."""
    if requested:
        return requested
    if configured:
        return configured
    return available_cores()
