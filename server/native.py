"""Compiled hot-path modules, used only while they match their source (issue 15, docs/native.md).

scripts/build_native.py (run by scripts/setup.sh) compiles a list of modules with mypyc into
.build/native/<python-tag>/, outside the source tree, with a manifest of each module's source
sha256. `install()` (called by server/__init__.py before any other server module is imported)
puts a meta-path finder in front of the normal import machinery that serves a module from its
.so only if the .py it was built from is the .py on disk now, and every compiled module it
calls natively is served compiled too; anything else imports as pure Python, as if nothing had
been built. `STREAMGATE_NATIVE=0` forces pure Python. `report()` logs once per process which
modules run compiled (the server calls it at start); `scripts/build_native.py --status`
prints it.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger("streamgate.native")

ROOT = Path(__file__).resolve().parent.parent
FORMAT = 1  # scripts/build_native.py's manifest layout
EXT_SUFFIX: str = sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def python_tag() -> str:
    return EXT_SUFFIX.strip(".").rsplit(".", 1)[0]


def default_build_dir() -> Path:
    return ROOT / ".build" / "native" / python_tag()


@dataclass
class Status:
    """What install() decided: the modules served compiled, the ones built but running pure
    Python because their source (or one they depend on) changed since, and why nothing at all
    runs compiled when that is the case."""

    compiled: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    pure_reason: str | None = "not installed"
    build_dir: Path | None = None

    def line(self) -> str:
        if self.pure_reason is not None:
            return f"native: pure Python ({self.pure_reason})"
        text = f"native: {len(self.compiled)} module(s) compiled: {', '.join(self.compiled)}"
        if self.stale:
            text += (f"; {len(self.stale)} changed since the build run as pure Python "
                     f"(scripts/setup.sh rebuilds): {', '.join(self.stale)}")
        return text


class NativeFinder(importlib.abc.MetaPathFinder):
    """Serves the named modules (and their mypyc group libraries) from their .so files."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        so = self.paths.get(fullname)
        if so is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(so))
        return importlib.util.spec_from_file_location(fullname, so, loader=loader)


_status = Status()
_finder: NativeFinder | None = None
_reported = False


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def plan(manifest: dict[str, Any], build_dir: Path, source_root: Path,
         ) -> tuple[dict[str, Path], list[str], list[str]]:
    """(module or library name -> .so, compiled module names, stale module names).

    A module is served compiled when its .so is there, its source and the uncompiled modules it
    imports (mypyc copies their `Final` constants into it) hash as recorded, and every module
    it depends on is served compiled too (mypyc calls across modules natively)."""
    modules: dict[str, Any] = manifest.get("modules", {})
    fresh: set[str] = set()
    for name, entry in modules.items():
        if ((build_dir / entry["so"]).is_file()
                and _sha256(source_root / entry["source"]) == entry["sha256"]
                and all(_sha256(source_root / source) == digest
                        for source, digest in entry.get("inputs", {}).items())):
            fresh.add(name)
    changed = True
    while changed:  # drop whatever depends on a dropped module, to a fixed point
        changed = False
        for name in sorted(fresh):
            if any(dep not in fresh for dep in modules[name].get("deps", [])):
                fresh.discard(name)
                changed = True
    paths = {name: build_dir / modules[name]["so"] for name in fresh}
    if fresh:
        # A module's own group library (<module>__mypyc) goes with it; shared ones always.
        for name, rel in manifest.get("libs", {}).items():
            owner = name.removesuffix("__mypyc")
            if owner in fresh or owner not in modules:
                paths[name] = build_dir / rel
    return paths, sorted(fresh), sorted(set(modules) - fresh)


def decide(env: str | None, build_dir: Path, source_root: Path,
           loaded: Sequence[str] = ()) -> tuple[Status, dict[str, Path]]:
    """What install() serves compiled: (status, module or library name -> .so). `env` is
    STREAMGATE_NATIVE's value; `loaded`, the modules already imported."""
    if env == "0":
        return Status(pure_reason="STREAMGATE_NATIVE=0"), {}
    try:
        manifest = json.loads((build_dir / "manifest.json").read_text())
    except FileNotFoundError:
        return Status(pure_reason=f"not built for {python_tag()}: scripts/setup.sh builds it "
                      "when a C compiler and the Python headers are there"), {}
    except (OSError, ValueError) as e:
        return Status(pure_reason=f"unreadable {build_dir / 'manifest.json'}: {e}"), {}
    if manifest.get("format") != FORMAT or manifest.get("python") != python_tag():
        return Status(pure_reason=f"{build_dir} was built by another build or Python"), {}
    paths, compiled, stale = plan(manifest, build_dir, source_root)
    if not compiled:
        return Status(stale=stale, build_dir=build_dir,
                      pure_reason="every compiled module changed since the build: "
                      "scripts/setup.sh rebuilds"), {}
    already = [name for name in compiled if name in loaded]
    if already:  # imported before install(): serving the rest could mix the two forms
        return Status(pure_reason=f"imported before the loader: {', '.join(already)}"), {}
    return Status(compiled=compiled, stale=stale, pure_reason=None, build_dir=build_dir), paths


def install(build_dir: Path | str | None = None, force: bool = False) -> Status:
    """Put the finder in front of sys.meta_path (once). `force` ignores STREAMGATE_NATIVE
    (the build's own import check uses it)."""
    global _status, _finder
    if _finder is not None:
        return _status
    where = Path(build_dir) if build_dir is not None else default_build_dir()
    env = None if force else os.environ.get("STREAMGATE_NATIVE")
    _status, paths = decide(env, where, ROOT, list(sys.modules))
    if paths:
        _finder = NativeFinder(paths)
        sys.meta_path.insert(0, _finder)
    return _status


def status() -> Status:
    return _status


def is_compiled(module: ModuleType) -> bool:
    return (getattr(module, "__file__", None) or "").endswith(EXT_SUFFIX)


def report(logger: logging.Logger = log) -> None:
    """One log line per process: what runs compiled, what is stale, or why all is pure."""
    global _reported
    if _reported:
        return
    _reported = True
    s = _status
    if s.pure_reason is None and not s.stale:
        logger.info(s.line())
    elif s.pure_reason == "STREAMGATE_NATIVE=0":
        logger.info(s.line())
    else:
        logger.warning(s.line())

