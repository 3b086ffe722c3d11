"""loadtest/ is development tooling: the server package imports nothing from it, and the wheel
does not ship it (issue 12: "loadtest out of the server's import graph and wheel")."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_namespace_packages

ROOT = Path(__file__).resolve().parents[2]


def _is_loadtest(module: str | None) -> bool:
    return module is not None and (module == "loadtest" or module.startswith("loadtest."))


def loadtest_imports(source: str, filename: str = "<source>") -> list[str]:
    """Every import of loadtest in one module: statements, and importlib / __import__ by name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_loadtest(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_loadtest(node.module):
            found.append(str(node.module))
        elif isinstance(node, ast.Call) and node.args:
            arg, func = node.args[0], node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if (name in ("import_module", "__import__") and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str) and _is_loadtest(arg.value)):
                found.append(arg.value)
    return found


def test_no_server_module_imports_loadtest() -> None:
    files = sorted((ROOT / "server").rglob("*.py"))
    assert len(files) > 50  # the walk sees the package
    hits = {str(f.relative_to(ROOT)): names for f in files
            if (names := loadtest_imports(f.read_text(), str(f)))}
    assert hits == {}


def test_the_checker_sees_every_form_of_import() -> None:
    source = ("import loadtest.swarm\nfrom loadtest import bench\nfrom .loadtest import x\n"
              "import importlib\nimportlib.import_module('loadtest.hotpath')\n"
              "__import__('loadtest')\nimport loadtesting\n")
    # A relative `.loadtest` is the server's own module, and `loadtesting` another package.
    assert loadtest_imports(source) == ["loadtest.swarm", "loadtest", "loadtest.hotpath",
                                        "loadtest"]


def test_running_the_cli_loads_no_loadtest_module() -> None:
    """The command line and the composition root, imported as `streamgate` runs them, from the
    checkout's root, where loadtest *is* importable: nothing pulls it in."""
    code = (
        "import json, sys\n"
        "import server.__main__ as cli, server.app\n"
        "cli.build_parser()\n"
        "loaded = sorted(m for m in sys.modules if m == 'loadtest' or m.startswith('loadtest.'))\n"
        "import loadtest.swarm\n"
        "print(json.dumps(loaded))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_the_wheel_ships_only_the_server_package() -> None:
    """What `[tool.setuptools.packages.find]` selects (setuptools finds namespace packages by
    default there, so the same function)."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]
    packages = [p for where in find.get("where", ["."])
                for p in find_namespace_packages(str(ROOT / where), include=find["include"],
                                                 exclude=find.get("exclude", ()))]
    assert "server" in packages and "server.flow_control" in packages
    # Beside the server: the wire contract and the client SDK it shares with the client
    # distribution (client/pyproject.toml); never loadtest.
    tops = {p.split(".")[0] for p in packages}
    assert tops == {"server", "streamgate_protocol", "streamgate_client"}, tops


def test_the_client_distribution_ships_the_sdk_and_the_wire_contract_only() -> None:
    """`pip install ./client` gets the client SDK and the wire contract, not the server."""
    find = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["tool"][
        "setuptools"]["packages"]["find"]
    packages = find_namespace_packages(str(ROOT / "client"), include=find["include"])
    assert sorted(packages) == ["streamgate_client", "streamgate_protocol"]
