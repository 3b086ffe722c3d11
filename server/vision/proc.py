"""Run the vision tools (tesseract, pdfinfo, pdftoppm) as subprocesses off the event loop.

The tools are CPU-bound and parse untrusted files, so each run has a deadline and is killed
(never left behind) on timeout or when the request that asked for it is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass


class ToolError(Exception):
    """The tool ran and failed (bad input, usually)."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


class ToolMissing(ToolError):
    """The tool is not installed on this machine (see scripts/setup.sh SYSTEM_PACKAGES)."""


class ToolTimeout(ToolError):
    """The tool did not finish within its deadline and was killed."""


@dataclass(frozen=True, slots=True)
class ToolResult:
    stdout: bytes
    stderr: str


# Tesseract's OpenMP threads fight each other when several pages are OCRed at once: measured on
# a 2-core machine, one page took 1.7 s with the default threading and 0.3 s with one thread.
_ENV = {**os.environ, "OMP_THREAD_LIMIT": "1"}


async def run_tool(args: list[str], *, stdin: bytes | None, timeout_s: float) -> ToolResult:
    """Run `args`, feed `stdin`, return stdout; ToolError on a non-zero exit."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_ENV,
        )
    except FileNotFoundError as exc:
        raise ToolMissing(f"{args[0]} is not installed") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
    except TimeoutError:
        await _kill(proc)
        raise ToolTimeout(f"{args[0]} did not finish within {timeout_s:g} s") from None
    except BaseException:
        # Cancelled (the client went away, a sibling page failed): no orphan keeps the CPU.
        await asyncio.shield(_kill(proc))
        raise
    stderr = err.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise ToolError(f"{args[0]} exited with status {proc.returncode}", stderr)
    return ToolResult(out, stderr)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(Exception):
        await proc.wait()
