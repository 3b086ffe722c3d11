"""The compiled hot path's loader (server/native.py, docs/native.md): a compiled module is
served only while its source matches the build, with the modules it calls natively; anything
else, a missing build or STREAMGATE_NATIVE=0 runs pure Python with one log line."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server import native

ROOT = Path(__file__).resolve().parents[2]
SUFFIX = native.EXT_SUFFIX


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_build(tmp_path: Path, sources: dict[str, bytes],
                deps: dict[str, list[str]] | None = None) -> tuple[Path, Path]:
    """A build dir whose manifest records `sources` (module -> source text) as built, with an
    (empty) .so each, and a source root holding those sources."""
    build, src = tmp_path / "build", tmp_path / "src"
    modules = {}
    for name, text in sources.items():
        rel = name.replace(".", "/")
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / f"{rel}.py").write_bytes(text)
        (build / rel).parent.mkdir(parents=True, exist_ok=True)
        (build / f"{rel}{SUFFIX}").write_bytes(b"")
        modules[name] = {"source": f"{rel}.py", "sha256": _sha(text), "so": f"{rel}{SUFFIX}",
                         "deps": (deps or {}).get(name, [])}
    (build / "manifest.json").write_text(json.dumps({
        "format": native.FORMAT, "python": native.python_tag(), "modules": modules,
        "libs": {"lib__mypyc": f"lib__mypyc{SUFFIX}",
                 **{f"{n}__mypyc": f"{n.replace('.', '/')}__mypyc{SUFFIX}" for n in sources}},
    }))
    return build, src


def test_fresh_modules_are_served_from_their_so(tmp_path: Path) -> None:
    build, src = _fake_build(tmp_path, {"pkg.a": b"A = 1\n", "pkg.b": b"B = 2\n"})
    status, paths = native.decide(None, build, src)
    assert status.pure_reason is None
    assert status.compiled == ["pkg.a", "pkg.b"] and status.stale == []
    assert paths["pkg.a"] == build / f"pkg/a{SUFFIX}"
    assert paths["lib__mypyc"] == build / f"lib__mypyc{SUFFIX}"
    assert status.line().startswith("native: 2 module(s) compiled: pkg.a, pkg.b")


def test_an_edited_source_runs_pure_with_what_calls_it_natively(tmp_path: Path) -> None:
    build, src = _fake_build(tmp_path, {"pkg.a": b"A = 1\n", "pkg.b": b"B = 2\n",
                                        "pkg.c": b"C = 3\n"},
                             deps={"pkg.b": ["pkg.a"], "pkg.c": ["pkg.b"]})
    (src / "pkg/a.py").write_bytes(b"A = 10\n")  # edited after the build
    status, paths = native.decide(None, build, src)
    # b calls a natively and c calls b: neither may run compiled beside a pure a
    assert status.pure_reason is not None and "changed since the build" in status.pure_reason
    assert status.stale == ["pkg.a", "pkg.b", "pkg.c"] and paths == {}


def test_a_stale_module_leaves_the_independent_ones_compiled(tmp_path: Path) -> None:
    build, src = _fake_build(tmp_path, {"pkg.a": b"A = 1\n", "pkg.b": b"B = 2\n"})
    (src / "pkg/b.py").write_bytes(b"B = 20\n")
    status, paths = native.decide(None, build, src)
    assert status.compiled == ["pkg.a"] and status.stale == ["pkg.b"]
    assert "pkg.b" not in paths and "pkg.b__mypyc" not in paths
    assert paths["pkg.a__mypyc"] == build / f"pkg/a__mypyc{SUFFIX}"
    assert "1 changed since the build run as pure Python" in status.line()


def test_an_edited_constant_in_an_uncompiled_import_makes_the_module_stale(
        tmp_path: Path) -> None:
    """mypyc copies a `Final` constant it imports into the compiled code: the build records
    the uncompiled modules a compiled one imports, and an edit there makes it stale too."""
    build, src = _fake_build(tmp_path, {"pkg.a": b"from pkg.limits import X\n",
                                        "pkg.b": b"B = 2\n"})
    (src / "pkg/limits.py").write_bytes(b"X: Final = 1\n")
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["modules"]["pkg.a"]["inputs"] = {"pkg/limits.py": _sha(b"X: Final = 1\n")}
    (build / "manifest.json").write_text(json.dumps(manifest))
    assert native.decide(None, build, src)[0].compiled == ["pkg.a", "pkg.b"]
    (src / "pkg/limits.py").write_bytes(b"X: Final = 2\n")  # edited after the build
    status, paths = native.decide(None, build, src)
    assert status.compiled == ["pkg.b"] and status.stale == ["pkg.a"] and "pkg.a" not in paths
    (src / "pkg/limits.py").unlink()  # gone: stale as well
    assert native.decide(None, build, src)[0].stale == ["pkg.a"]


def test_the_build_records_the_uncompiled_first_party_imports() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_native
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    inputs = build_native.inputs_of("server/sessions/asr.py", set(build_native.MODULES))
    assert "server/flow_control/finals.py" in inputs  # FINALS_TIMEOUT_S, a Final it copies
    assert "server/sessions/asr_runner.py" not in inputs  # compiled: tracked by deps
    assert all(not p.startswith(("numpy", "msgspec")) for p in inputs)  # first party only
    assert inputs["server/flow_control/finals.py"] == _sha(
        (ROOT / "server/flow_control/finals.py").read_bytes())


def test_a_missing_so_runs_pure(tmp_path: Path) -> None:
    build, src = _fake_build(tmp_path, {"pkg.a": b"A = 1\n", "pkg.b": b"B = 2\n"})
    (build / f"pkg/a{SUFFIX}").unlink()
    status, paths = native.decide(None, build, src)
    assert status.compiled == ["pkg.b"] and status.stale == ["pkg.a"]
    assert "pkg.a" not in paths


def test_no_build_a_foreign_build_or_the_switch_mean_pure_python(tmp_path: Path) -> None:
    build, src = _fake_build(tmp_path, {"pkg.a": b"A = 1\n"})
    status, paths = native.decide("0", build, src)
    assert (status.pure_reason, paths) == ("STREAMGATE_NATIVE=0", {})
    status, paths = native.decide(None, tmp_path / "nothing", src)
    assert status.pure_reason is not None and "not built" in status.pure_reason and paths == {}
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["python"] = "cpython-399-elsewhere"
    (build / "manifest.json").write_text(json.dumps(manifest))
    status, paths = native.decide(None, build, src)
    assert status.pure_reason is not None and "another build" in status.pure_reason
    assert paths == {}


def test_a_module_imported_before_the_loader_keeps_everything_pure(tmp_path: Path) -> None:
    build, src = _fake_build(tmp_path, {"pkg.a": b"A = 1\n", "pkg.b": b"B = 2\n"})
    status, paths = native.decide(None, build, src, loaded=["pkg.b"])
    assert status.pure_reason == "imported before the loader: pkg.b" and paths == {}


def test_report_logs_one_line_per_process(caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_reported", False)
    monkeypatch.setattr(native, "_status", native.Status(pure_reason="not built for x"))
    with caplog.at_level(logging.INFO, logger="streamgate.native"):
        native.report()
        native.report()
    lines = [r for r in caplog.records if r.name == "streamgate.native"]
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (logging.WARNING, "native: pure Python (not built for x)")]


def _import_in_child(env: dict[str, str]) -> dict[str, object]:
    code = ("import json, server.native as n, server.ws.connection as c; "
            "print(json.dumps({'line': n.status().line(), 'compiled': n.is_compiled(c)}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


def test_the_switch_forces_pure_python_in_a_real_process() -> None:
    result = _import_in_child({"STREAMGATE_NATIVE": "0"})
    assert result == {"line": "native: pure Python (STREAMGATE_NATIVE=0)", "compiled": False}


def test_the_build_this_checkout_made_is_used_when_fresh() -> None:
    """scripts/setup.sh builds .build/native/ where a compiler is (every test run: test.sh);
    whatever it compiled must be what a process runs, unless a source changed since."""
    manifest_path = native.default_build_dir() / "manifest.json"
    if not manifest_path.is_file():
        pytest.skip("no native build here (no C compiler or Python headers at set-up)")
    manifest = json.loads(manifest_path.read_text())
    _, compiled, _ = native.plan(manifest, native.default_build_dir(), ROOT)
    result = _import_in_child({"STREAMGATE_NATIVE": "1"})
    line = str(result["line"])
    if compiled:
        assert line.startswith(f"native: {len(compiled)} module(s) compiled")
        assert result["compiled"] is ("server.ws.connection" in compiled)
    else:
        assert line.startswith("native: pure Python") and result["compiled"] is False


def test_the_build_reads_native_dependencies_from_a_group_library(tmp_path: Path) -> None:
    """mypyc calls another group natively where the types say so, imported or not: the build
    records the groups a library imports (their names are in its data) as dependencies."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_native
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    lib = tmp_path / f"runner__mypyc{SUFFIX}"
    lib.write_bytes(b"\x7fELF\x00server.flow_control.ingest_queue__mypyc\x00"
                    b"exec_runner__mypyc\x00server.other__mypyc\x00")
    names = {"server.flow_control.ingest_queue", "server.flow_control.credit"}
    assert build_native.native_deps(lib, names) == ["server.flow_control.ingest_queue"]
