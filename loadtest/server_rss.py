"""`python -m server` with a memory probe inside: `python -m loadtest.server_rss serve ...`.

loadtest/call_rss.py starts the server through this wrapper (through loadtest/pin.py, as the
bench does). It runs the server's own CLI unchanged in the same process, after:

- `STREAMGATE_RSS_TRACEMALLOC=N` (optional): tracemalloc started with N frames per trace
  before anything of the server is imported (it costs memory and CPU: a run that reads RSS
  growth per call leaves it off; a run that looks for allocation sites turns it on);
- `STREAMGATE_RSS_ALLOCATOR` (optional, e.g. `arena_max=2,trim_threshold=131072`): glibc
  malloc settings applied with server/infra/allocator.py before the server starts (how a
  lever is measured before it has a config key);
- a SIGUSR2 handler: each signal writes `<STREAMGATE_RSS_DUMP_DIR>/dump-<n>.json` (glibc's
  mallinfo2 and per-arena malloc_info, pymalloc's arena stats from sys._debugmallocstats, the
  live objects by type, threads, asyncio tasks) and, with tracemalloc on,
  `dump-<n>.tracemalloc` (a snapshot call_rss.py diffs), then `dump-<n>.done`.

The handler runs between two bytecodes of the event loop's thread (a Python signal handler):
it stalls the loop for the dump's duration, which the probe's caller chooses (not inside a
window whose lag is judged).
"""

from __future__ import annotations

import os
import sys
import tracemalloc

_FRAMES = int(os.environ.get("STREAMGATE_RSS_TRACEMALLOC", "0") or 0)
if _FRAMES > 0:
    tracemalloc.start(_FRAMES)

import asyncio  # noqa: E402
import collections  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

from server.infra import allocator  # noqa: E402

DUMP_DIR_ENV = "STREAMGATE_RSS_DUMP_DIR"
ALLOCATOR_ENV = "STREAMGATE_RSS_ALLOCATOR"
_count = 0


def pymalloc_stats() -> dict[str, int]:
    """What sys._debugmallocstats() says of pymalloc's arenas (it writes to the C stderr: fd 2
    is pointed at a temporary file for the call)."""
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    out: dict[str, int] = {}
    for line in text.splitlines():
        if "=" not in line:
            continue
        name, _, value = line.rpartition("=")
        name = name.strip().lstrip("#").strip()
        value = value.strip().replace(",", "")
        if value.isdigit() and name:
            out[name] = int(value)
    return out


def objects_by_type(top: int = 40) -> list[tuple[str, int]]:
    counts: collections.Counter[str] = collections.Counter(
        type(o).__qualname__ for o in gc.get_objects())
    return counts.most_common(top)


def untracked_referents(top: int = 25) -> list[tuple[str, int, int]]:
    """Objects the collector does not track (C extension objects such as soxr streams, numpy
    arrays, bytes) reached from tracked ones, by type: (type, count, bytes by sys.getsizeof
    or an array's nbytes); each object counted once."""
    seen: set[int] = set()
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        for ref in gc.get_referents(obj):
            if gc.is_tracked(ref) or id(ref) in seen:
                continue
            seen.add(id(ref))
            name = type(ref).__module__ + "." + type(ref).__qualname__
            counts[name] += 1
            nbytes = getattr(ref, "nbytes", None)
            owns = getattr(ref, "base", None) is None
            try:
                sizes[name] += (int(nbytes) if isinstance(nbytes, int) and owns
                                else sys.getsizeof(ref))
            except TypeError:
                pass
    return [(name, n, sizes[name]) for name, n in counts.most_common(top)]


def buffer_holders(min_size: int = 512, top: int = 25) -> list[tuple[str, int, int]]:
    """Who holds the large buffers (bytes, bytearray, memoryview, numpy arrays of >= min_size
    bytes): the type of each tracked object that refers to one, how many and their bytes."""
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    seen: set[int] = set()
    for obj in gc.get_objects():
        for ref in gc.get_referents(obj):
            if not isinstance(ref, bytes | bytearray | memoryview) and not hasattr(ref, "nbytes"):
                continue
            size = sys.getsizeof(ref) if isinstance(ref, bytes | bytearray) else int(
                getattr(ref, "nbytes", 0))
            if size < min_size or id(ref) in seen:
                continue
            seen.add(id(ref))
            holder = type(obj)
            name = f"{holder.__module__}.{holder.__qualname__} -> {type(ref).__qualname__}"
            counts[name] += 1
            sizes[name] += size
    return [(name, counts[name], size) for name, size in sizes.most_common(top)]


def dump(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mallinfo2": allocator.mallinfo2(),
        "malloc_info": allocator.malloc_info(),
        "pymalloc": pymalloc_stats(),
        "threads": [t.name for t in threading.enumerate()],
        "gc_counts": list(gc.get_count()),
        "gc_objects": len(gc.get_objects()),
        "gc_frozen": gc.get_freeze_count(),
        "objects_by_type": objects_by_type(),
        "untracked": untracked_referents(),
        "buffers": buffer_holders(),
    }
    try:
        out["tasks"] = len(asyncio.all_tasks())
    except RuntimeError:
        out["tasks"] = None
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        out["tracemalloc"] = {"current": current, "peak": peak}
        tracemalloc.take_snapshot().dump(str(path.with_suffix(".tracemalloc")))
    path.write_text(json.dumps(out))
    path.with_suffix(".done").touch()
    return out


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _count
    _count += 1
    where = Path(os.environ.get(DUMP_DIR_ENV) or tempfile.gettempdir())
    dump(where / f"dump-{_count}.json")


def main(argv: list[str]) -> int:
    settings = os.environ.get(ALLOCATOR_ENV, "")
    if settings:
        allocator.apply(allocator.parse(settings))
    signal.signal(signal.SIGUSR2, _on_signal)
    from server.__main__ import main as server_main

    return server_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
