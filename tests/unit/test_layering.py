"""The layout shows the architecture (issue 12 parts 4-5): which server package may import
which, checked on the import statements themselves (ast), so an edge cannot creep back in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module `module` imports, relative imports resolved, including the ones under
    `if TYPE_CHECKING:` (a type-only edge is still an edge a reader has to know about)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from server import billing` imports the package server.billing
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def package_imports(package: str) -> dict[str, set[str]]:
    folder = ROOT.joinpath(*package.split("."))
    module_file = folder.with_suffix(".py")  # a single module is checked as well as a package
    files = [module_file] if module_file.is_file() else sorted(folder.rglob("*.py"))
    assert files, f"no modules under {folder}"
    return {module_name(f): imports_of(f.read_text(), module_name(f),
                                       is_package=f.name == "__init__.py") for f in files}


def edges_into(package: str, forbidden: str) -> dict[str, list[str]]:
    hits = {}
    for module, names in package_imports(package).items():
        bad = sorted(n for n in names if n == forbidden or n.startswith(forbidden + "."))
        if bad:
            hits[module] = bad
    return hits


@pytest.mark.parametrize(("package", "forbidden"), [
    ("server.billing", "server.ws"),  # billing raises its own exceptions, knows no sockets
    ("server.ws", "server.billing"),  # sockets know no billing: admission ports only
    ("server.protocol", "server.ws"),
    ("server.protocol", "server.billing"),
    ("server.protocol", "server.sessions"),
    # The embedded Redis/PostgreSQL supervisor is development tooling: billing is handed URLs.
    ("server.billing", "server.infra"),
    # Runners and calls are hosted through the SessionHost port (server/sessions/host.py), not
    # the WebSocket listener: an HTTP request or a test hosts them just as well.
    ("server.sessions", "server.ws.server"),
    ("server.telephony", "server.ws.server"),
    # Sessions own the upgrade contract (server/sessions/upgrade.py: UpgradeRequest, Admitted,
    # SessionSocket, SessionHandler) and the listener implements it: no session, call or HTTP
    # speech route sees the WebSocket code, so each runs on an HTTP request or a fake alike.
    ("server.sessions", "server.ws"),
    ("server.telephony", "server.ws"),
    ("server.http", "server.ws"),
    # A dialect (Deepgram, Sarvam) is a codec in front of the same sessions, hosted the same way.
    ("server.compat", "server.ws"),
    ("server.compat", "server.billing.service"),
    # Provider codecs are sans-I/O dialect translators: no call, no session, no socket.
    ("server.telephony.providers", "server.telephony.call"),
    ("server.telephony.providers", "server.sessions"),
    ("server.telephony.providers", "server.ws"),
])
def test_no_import_edge(package: str, forbidden: str) -> None:
    assert edges_into(package, forbidden) == {}


def test_only_the_listener_assigns_its_session_count() -> None:
    """Sessions are counted through `SessionHost.session_opened/closed`; an assignment from
    outside would let the count drift from what the listener's admission bound reads."""
    assigners = set()
    for path in sorted(ROOT.joinpath("server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign)
                       else [])
            if any(isinstance(t, ast.Attribute) and t.attr == "session_count" for t in targets):
                assigners.add(module_name(path))
    assert assigners == {"server.ws.server"}


def test_only_the_composition_roots_start_the_embedded_servers() -> None:
    importers = {module for module, names in package_imports("server").items()
                 if not module.startswith("server.infra")
                 and any(n == "server.infra" or n.startswith("server.infra.") for n in names)}
    # The worker supervisor (`serve --workers N`) is the composition root of a node: it
    # starts the stores once and hands every worker their URLs.
    roots = {m for m in importers if m.startswith("server.supervisor.")}
    assert importers - roots == {"server.app", "server.__main__"}


def client_package_imports(package: str) -> dict[str, set[str]]:
    """The modules of a package of the client distribution (client/<package>)."""
    folder = ROOT / "client" / package
    out = {}
    for f in sorted(folder.rglob("*.py")):
        name = package if f.name == "__init__.py" else f"{package}.{f.stem}"
        out[name] = imports_of(f.read_text(), name, is_package=f.name == "__init__.py")
    return out


@pytest.mark.parametrize(("package", "allowed"), [
    # The client SDK is a complete client to copy from, installable on its own
    # (`pip install ./client`): the wire contract and itself, nothing of the server.
    ("streamgate_client", ("streamgate_protocol", "streamgate_client")),
    # The wire contract is shared by both sides: it depends on neither.
    ("streamgate_protocol", ("streamgate_protocol",)),
])
def test_the_client_distribution_imports_nothing_of_the_server(
        package: str, allowed: tuple[str, ...]) -> None:
    hits = {}
    for module, names in client_package_imports(package).items():
        ours = sorted(n for n in names if n == "server" or n.startswith(("server.", "streamgate_"))
                      if not n.startswith(allowed))
        if ours:
            hits[module] = ours
    assert hits == {}


def test_the_server_package_holds_no_client() -> None:
    assert not (ROOT / "server" / "client").exists()
    # Only the CLI (`streamgate asr`, `tts`, `call-sim`) uses the client SDK.
    users = {module for module, names in package_imports("server").items()
             if any(n == "streamgate_client" or n.startswith("streamgate_client.")
                    for n in names)}
    assert users == {"server.__main__"}


def test_the_checker_resolves_relative_and_aliased_imports() -> None:
    source = ("import server.ws.handshake as hs\nfrom ..ws import server\nfrom . import meter\n"
              "from server import ws\nfrom typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from server.ws.connection import WsConnection\n")
    found = imports_of(source, "server.billing.service")
    assert {"server.ws.handshake", "server.ws", "server.ws.server", "server.billing.meter",
            "server.ws.connection"} <= found
    # A module of its own package that happens to be called `ws` is no edge into server.ws.
    assert "server.ws" not in imports_of("from .ws import x\n", "server.billing.service")
