"""Compile the server's hot path with mypyc into .build/native/<python-tag>/ (issue 15).

Run by scripts/setup.sh; by hand: `.venv/bin/python scripts/build_native.py [--force] [-v]`.

The compiled modules live outside the source tree, so an edited .py is never shadowed by a
stale .so: server/native.py (installed by server/__init__.py) imports a compiled module only if
the sha256 of its .py matches the one recorded here in manifest.json, and runs everything else
as pure Python. Each module is its own mypyc group (separate compilation); a module mypyc
refuses, or whose compiled form fails to import, is left out with a log line and the rest are
rebuilt without it. No C compiler or no Python headers: one log line, exit 0, pure Python.

Quick when nothing changed: the manifest's hashes are compared with the sources first.
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The hot path, by measured yield (docs/decisions/15C1-mypyc-hot-path.md). Paths relative to
# the repository root; each must be mypy --strict clean (it is: `make lint`).
MODULES: tuple[str, ...] = (
    "server/ws/connection.py",
    "server/sessions/asr.py",
    "server/sessions/asr_runner.py",
    "server/sessions/tts.py",
    "server/telephony/call/endpoint.py",
    "server/telephony/call/meters.py",
    "server/telephony/call/session.py",
    "server/telephony/providers/events.py",
    "server/models/batcher.py",
    "server/models/synthetic.py",
    "server/models/tts_synthetic.py",
    "server/audio/vad.py",
    "server/audio/resample.py",
    "server/audio/encoders.py",
    "server/flow_control/audio_backlog.py",
    "server/flow_control/byte_queue.py",
    "server/flow_control/credit.py",
    "server/flow_control/ingest_queue.py",
    "server/flow_control/mark_window.py",
    "server/flow_control/outbox.py",
    "server/flow_control/text_backlog.py",
    "server/flow_control/wakeup.py",
)

FORMAT = 1  # manifest layout; server/native.py refuses any other


def log(msg: str) -> None:
    print(f"native: {msg}", file=sys.stderr, flush=True)


def python_tag() -> str:
    """cpython-311-x86_64-linux-gnu: an extension built for one interpreter is never loaded
    by another (the virtualenvs of CI's 3.11 and 3.13 runs share the checkout)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return suffix.strip(".").rsplit(".", 1)[0]


def out_dir() -> Path:
    return ROOT / ".build" / "native" / python_tag()


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mypy_version() -> str:
    from mypy.version import __version__

    return __version__


def why_no_toolchain() -> str | None:
    """None when a C compiler and Python.h are there, else what is missing."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(os.environ.get("CC", cc).split()[0]) is None:
        return f"no C compiler ({os.environ.get('CC', cc)})"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        return f"no Python headers ({include}/Python.h; Debian: python3-dev)"
    try:
        import mypyc  # noqa: F401
    except ImportError:
        return "mypyc is not installed (pip install -e '.[dev]')"
    return None


def imports_of(path: Path, names: set[str]) -> list[str]:
    """The listed modules that `path` imports (directly); a compiled module calls another
    compiled one natively, so it may only run compiled when that one does."""
    tree = ast.parse(path.read_bytes())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return sorted(found & names)


FIRST_PARTY = ("server", "streamgate_protocol", "streamgate_client")


def _module_file(dotted: str) -> str | None:
    """The repository path of a first-party module (server.x -> server/x.py, a package's
    __init__.py, streamgate_protocol.x under client/), or None."""
    if dotted.split(".", 1)[0] not in FIRST_PARTY:
        return None
    stem = dotted.replace(".", "/")
    for base in ("", "client/"):
        for candidate in (f"{base}{stem}.py", f"{base}{stem}/__init__.py"):
            if (ROOT / candidate).is_file():
                return candidate
    return None


def inputs_of(path: str, listed: set[str]) -> dict[str, str]:
    """{path: sha256} of the first-party modules `path` imports that are not compiled
    themselves: mypyc copies their `Final` constants into the compiled code, so an edit there
    must make this module stale as an edit of its own source does (a compiled dependency is
    tracked by `deps`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / path).read_bytes())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        for name in names:
            source = _module_file(name)
            if source is not None and source != path and source not in listed:
                found.add(source)
    return {source: sha256(ROOT / source) for source in sorted(found)}


GROUP_RE = re.compile(rb"([A-Za-z_][\w.]*)__mypyc\x00")


def native_deps(group_lib: Path, names: set[str]) -> list[str]:
    """The listed modules whose group library `group_lib` imports: mypyc calls into another
    compiled module natively wherever the types say so (an attribute typed with its class, a
    call of its function), imported directly or not. The names are in the library's data."""
    found = {m.group(1).decode() for m in GROUP_RE.finditer(group_lib.read_bytes())}
    return sorted(found & names)


def up_to_date(modules: list[str]) -> bool:
    manifest = out_dir() / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if data.get("format") != FORMAT or data.get("mypy") != mypy_version():
        return False
    if sorted(data.get("requested", [])) != sorted(modules):
        return False
    built = data.get("modules", {})
    excluded = data.get("excluded", {})
    for path in modules:
        name = module_name(path)
        digest = sha256(ROOT / path)
        if name in built:
            if built[name]["sha256"] != digest or not (out_dir() / built[name]["so"]).is_file():
                return False
            for source, want in built[name].get("inputs", {}).items():
                if not (ROOT / source).is_file() or sha256(ROOT / source) != want:
                    return False
        elif excluded.get(name, {}).get("sha256") != digest:
            return False
    return True


BUILD_SNIPPET = r"""
import sys
from setuptools import setup
from mypyc.build import mypycify
paths, build_lib, build_temp, target = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
setup(
    name="streamgate-native",
    ext_modules=mypycify(paths.split(","), separate=True, opt_level="3", target_dir=target),
    script_args=["build_ext", "--build-lib", build_lib, "--build-temp", build_temp],
)
"""

ERROR_RE = re.compile(r"^(?P<path>[\w./-]+\.py):\d+(?::\d+)?: error:", re.M)


def compile_once(modules: list[str], work: Path, verbose: bool) -> tuple[bool, str]:
    """One mypyc + C build of `modules` into work/lib; (ok, output). `work` persists between
    builds: mypyc rewrites only the C files that change, and setuptools recompiles only those,
    so rebuilding after an edit to one module costs that module (and what depends on it)."""
    # A mypy cache of its own: mypyc's, kept for quick rebuilds, is not the linter's.
    env = dict(os.environ, MYPYPATH="client", MYPY_CACHE_DIR=str(work / "mypy-cache"))
    proc = subprocess.run(
        [sys.executable, "-c", BUILD_SNIPPET, ",".join(modules), str(work / "lib"),
         str(work / "tmp"), str(work / "c")],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )
    output = proc.stdout + proc.stderr
    if verbose:
        sys.stderr.write(output)
    return proc.returncode == 0, output


def drop_outputs(lib: Path, path: str) -> None:
    """Remove a left-out module's extension and group library from a build's output."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    stem = path.removesuffix(".py")
    for name in (stem + suffix, stem + "__mypyc" + suffix):
        (lib / name).unlink(missing_ok=True)


SMOKE = r"""
import importlib, json, sys, traceback
sys.path.insert(0, sys.argv[2])
from server import native
native.install(build_dir=sys.argv[1], force=True)
sources = dict(item.split("=", 1) for item in sys.argv[4].split(","))
bad = {}
for name in sys.argv[3].split(","):
    try:
        mod = importlib.import_module(name)
        if not native.is_compiled(mod):
            bad[name] = ["imported as pure Python", name]
    except BaseException as e:  # noqa: BLE001
        # The culprit is the compiled module whose code raised (its frames carry its .py
        # name), not necessarily the one imported: that may only import it.
        culprit = name
        for frame in traceback.extract_tb(e.__traceback__):
            for source, module in sources.items():
                if frame.filename.endswith(source):
                    culprit = module
        bad[name] = [f"{type(e).__name__}: {e}", culprit]
print(json.dumps(bad))
"""


def smoke_import(lib: Path, modules: list[str]) -> dict[str, str]:
    """Import the compiled modules in fresh interpreters: {module to leave out: why}."""
    sources = ",".join(f"{p}={module_name(p)}" for p in modules)

    def run(names: list[str]) -> dict[str, list[str]]:
        proc = subprocess.run(
            [sys.executable, "-c", SMOKE, str(lib), str(ROOT), ",".join(names), sources],
            cwd=ROOT, capture_output=True, text=True, check=False,
            env=dict(os.environ, STREAMGATE_NATIVE="0"),  # server/__init__.py: hands off
        )
        try:
            result: dict[str, list[str]] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            last = (proc.stderr.strip().splitlines() or ["crashed"])[-1]
            result = {name: [last, name] for name in names}
        return result

    names = [module_name(p) for p in modules]
    if not run(names):
        return {}  # all at once in one interpreter: the usual case
    failed: dict[str, str] = {}
    for name in names:  # one at a time, to tell which
        for why, culprit in run([name]).values():
            failed.setdefault(culprit, why if culprit == name else f"{why} (importing {name})")
    return failed


def write_manifest(lib: Path, requested: list[str], built: list[str],
                   excluded: dict[str, str]) -> None:
    names = {module_name(p) for p in built}
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    modules = {}
    for path in built:
        name = module_name(path)
        so = path.removesuffix(".py") + suffix
        if not (lib / so).is_file():
            raise SystemExit(f"native: {so} missing after the build")
        deps = set(imports_of(ROOT / path, names - {name}))
        group_lib = lib / (path.removesuffix(".py") + "__mypyc" + suffix)
        if group_lib.is_file():
            deps.update(native_deps(group_lib, names - {name}))
        modules[name] = {"source": path, "sha256": sha256(ROOT / path), "so": so,
                         "deps": sorted(deps), "inputs": inputs_of(path, set(requested))}
    # The groups' runtime libraries (separate compilation: one per module) and mypyc's own.
    libs = {}
    for so_path in lib.rglob("*" + suffix):
        rel = so_path.relative_to(lib).as_posix()
        dotted = rel.removesuffix(suffix).replace("/", ".")
        if dotted not in modules:
            libs[dotted] = rel
    (lib / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "python": python_tag(), "mypy": mypy_version(),
        "requested": requested, "modules": modules, "libs": libs,
        "excluded": {module_name(p): {"sha256": sha256(ROOT / p), "why": why}
                     for p, why in excluded.items()},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=1, sort_keys=True) + "\n")


def build(modules: list[str], verbose: bool) -> int:
    todo = list(modules)
    excluded: dict[str, str] = {}
    retried = False
    t0 = time.monotonic()
    dest = out_dir()
    work = dest.with_name(dest.name + ".work")
    # The last build's outputs stay (setuptools skips an extension older than its C files),
    # but only for modules still listed.
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    listed = {p.removesuffix(".py") for p in modules}
    for so in (work / "lib").rglob("*" + suffix) if (work / "lib").is_dir() else ():
        stem = so.relative_to(work / "lib").as_posix().removesuffix(suffix)
        if stem.removesuffix("__mypyc") not in listed:
            so.unlink()
    while todo:
        ok, output = compile_once(todo, work, verbose)
        if not ok:
            bad = {m.group("path") for m in ERROR_RE.finditer(output)} & set(todo)
            if not bad and not retried:
                # mypyc's incremental cache has crashed it (an internal error naming no
                # module) after a module was left out: once more from a clean cache.
                retried = True
                shutil.rmtree(work / "mypy-cache", ignore_errors=True)
                continue
            if not bad:
                tail = " | ".join(output.strip().splitlines()[-3:])
                log(f"build failed, running pure Python: {tail}")
                return 0
            for path in sorted(bad):
                why = next(line for line in output.splitlines() if line.startswith(path))
                log(f"left out {path}: {why.split(': error: ', 1)[-1]}")
                excluded[path] = why
                todo.remove(path)
                drop_outputs(work / "lib", path)
            continue
        write_manifest(work / "lib", modules, todo, excluded)
        broken = smoke_import(work / "lib", todo)
        if not broken:
            break
        for name, why in sorted(broken.items()):
            path = next(p for p in todo if module_name(p) == name)
            log(f"left out {path}: compiled, but its import fails ({why})")
            excluded[path] = why
            todo.remove(path)
            drop_outputs(work / "lib", path)
    if not todo:
        log("no module compiled; running pure Python")
        return 0
    write_manifest(work / "lib", modules, todo, excluded)
    # Swap the finished build in whole: a server starting meanwhile sees the old or the new.
    new = dest.with_name(dest.name + ".new")
    old = dest.with_name(dest.name + ".old")
    for stale in (new, old):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.copytree(work / "lib", new)
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    log(f"compiled {len(todo)} of {len(modules)} modules into "
        f"{dest.relative_to(ROOT)} in {time.monotonic() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("-v", "--verbose", action="store_true", help="show mypyc's and cc's output")
    ap.add_argument("--status", action="store_true",
                    help="print what a server started now would run compiled, and exit")
    args = ap.parse_args(argv)
    if args.status:
        sys.path.insert(0, str(ROOT))
        from server import native  # installs the loader as any server process does

        print(native.status().line())
        return 0
    modules = list(MODULES)
    if os.environ.get("STREAMGATE_NATIVE", "1") == "0":
        log("STREAMGATE_NATIVE=0: not building; the server runs pure Python")
        return 0
    missing = why_no_toolchain()
    if missing is not None:
        log(f"{missing}: not compiling; the server runs pure Python")
        return 0
    if not args.force and up_to_date(modules):
        return 0
    # One build at a time per checkout and Python (two test runs may start set-up at once).
    out_dir().parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir().with_name(out_dir().name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not args.force and up_to_date(modules):
            return 0  # the other one built it
        log(f"compiling {len(modules)} hot-path modules with mypyc {mypy_version()} "
            "(once per change; docs/native.md)")
        return build(modules, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
