"""glibc malloc: its settings (mallopt) and what it holds (mallinfo2, malloc_info), via ctypes.

Used by the memory probes (loadtest/server_rss.py) and, for the settings, at server start
(docs/decisions/15R1-allocator-settings.md). Everything here is a no-op that returns None/False
where the C library is not glibc (musl, macOS): nothing else of the server depends on it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

# mallopt(3) parameters (glibc's malloc.h).
PARAMS: dict[str, int] = {
    "mxfast": 1,
    "trim_threshold": -1,
    "top_pad": -2,
    "mmap_threshold": -3,
    "mmap_max": -4,
    "arena_test": -7,
    "arena_max": -8,
}

_MALLINFO2_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS]


_libc: ctypes.CDLL | None = None
_loaded = False


def libc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has mallinfo2: glibc >= 2.33), else None."""
    global _libc, _loaded
    if not _loaded:
        _loaded = True
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            lib.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            lib.mallopt.restype = ctypes.c_int
            lib.malloc_trim.argtypes = (ctypes.c_size_t,)
            lib.malloc_trim.restype = ctypes.c_int
            lib.mallinfo2.restype = _Mallinfo2
            lib.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
            lib.malloc_info.restype = ctypes.c_int
            lib.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
            lib.fopen.restype = ctypes.c_void_p
            lib.fclose.argtypes = (ctypes.c_void_p,)
            lib.fclose.restype = ctypes.c_int
            _libc = lib
        except (OSError, AttributeError):
            _libc = None
    return _libc


def parse(text: str) -> dict[str, int]:
    """`arena_max=2,trim_threshold=131072` -> {"arena_max": 2, "trim_threshold": 131072}.
    Raises ValueError on an unknown name or a value that is not an integer."""
    out: dict[str, int] = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or name not in PARAMS:
            raise ValueError(f"malloc setting {item!r}: expected one of {sorted(PARAMS)}=N")
        out[name] = int(value, 0)
    return out


def apply(settings: Mapping[str, int]) -> dict[str, bool]:
    """mallopt() each setting; {name: accepted}. Empty where the C library is not glibc."""
    lib = libc()
    if lib is None:
        return {}
    return {name: bool(lib.mallopt(PARAMS[name], int(value))) for name, value in settings.items()}


def trim(pad: int = 0) -> bool | None:
    """malloc_trim(pad): give free heap memory back to the kernel (None: not glibc)."""
    lib = libc()
    return None if lib is None else bool(lib.malloc_trim(pad))


def mallinfo2() -> dict[str, int] | None:
    """glibc's mallinfo2(): bytes in the main arena (`arena`), in mmap'd chunks (`hblkhd`),
    in use (`uordblks`) and free (`fordblks`) over all arenas..."""
    lib = libc()
    if lib is None:
        return None
    info = lib.mallinfo2()
    return {name: int(getattr(info, name)) for name in _MALLINFO2_FIELDS}


def malloc_info() -> dict[str, Any] | None:
    """glibc's malloc_info(3), parsed: per arena (`heaps`) the bytes it has from the system
    (`current`, `max`) and the free bytes it keeps (`free`: fast bins + the rest), and the
    totals, with the mmap'd chunks (`mmap_count`, `mmap_bytes`)."""
    lib = libc()
    if lib is None:
        return None
    fd, path = tempfile.mkstemp(prefix="malloc-info-")
    os.close(fd)
    try:
        fp = lib.fopen(path.encode(), b"w")
        if not fp:
            return None
        try:
            lib.malloc_info(0, fp)
        finally:
            lib.fclose(fp)
        with open(path, "rb") as fh:
            root = ET.fromstring(fh.read())
    finally:
        os.unlink(path)
    return _parse_malloc_info(root)


def _sizes(node: ET.Element) -> dict[str, int]:
    out: dict[str, int] = {}
    for child in node:
        kind = child.get("type")
        if kind is None:
            continue
        if child.tag == "total":
            out[f"{kind}_count"] = int(child.get("count", "0"))
            out[f"{kind}_bytes"] = int(child.get("size", "0"))
        elif child.tag == "system":
            out[f"system_{kind}"] = int(child.get("size", "0"))
        elif child.tag == "aspace":
            out[f"aspace_{kind}"] = int(child.get("size", "0"))
    out["free"] = out.get("fast_bytes", 0) + out.get("rest_bytes", 0)
    return out


def _parse_malloc_info(root: ET.Element) -> dict[str, Any]:
    heaps = []
    for heap in root.findall("heap"):
        entry: dict[str, Any] = {"nr": int(heap.get("nr", "-1")), **_sizes(heap)}
        heaps.append(entry)
    return {"heaps": heaps, "total": _sizes(root)}
