"""Run a command pinned to one CPU: `python -m loadtest.pin CPU -- command args...`.

The bench starts every server through this wrapper. It pins itself (so every thread the server
creates later inherits the mask), asks the kernel to SIGTERM it if the bench dies (so a killed
bench never leaves a server behind), raises the open-files soft limit to the hard limit, then
exec()s the server: the pid stays the same, so /proc/<pid> is the server's own.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE := hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def die_with_parent() -> None:
    """Best effort: Linux prctl(PR_SET_PDEATHSIG, SIGTERM); it survives exec()."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m loadtest.pin CPU[,CPU...] -- command [args...]", file=sys.stderr)
        return 2
    cpus = {int(c) for c in argv[0].split(",") if c != ""}
    if cpus:
        os.sched_setaffinity(0, cpus)
    die_with_parent()
    raise_nofile_limit()
    os.execvp(argv[2], argv[2:])
    return 127  # pragma: no cover - execvp does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
