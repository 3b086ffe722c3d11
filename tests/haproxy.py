"""Two streamgate nodes behind a real HAProxy (issue 13 item 5), for the tests that go through a
load balancer: one Redis and one PostgreSQL (the suite's), nodes on 127.0.0.2 and 127.0.0.3 with
the same ports, HAProxy on 127.0.0.1 running deploy/haproxy/streamgate.cfg (the file docs/deploy.md
shows) with fast health checks on /readyz.

Both nodes carry one STREAMGATE_DEPLOYMENT_ID: on one host the port guard (server/ws/port_guard.py)
claims a port number for every address, so two unrelated servers on 127.0.0.2:P and 127.0.0.3:P
would refuse each other; on separate machines, as in production, nothing is shared. A
supervisor passes an operator-set id on to its workers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.infra.embedded import create_database, drop_database
from tests.e2e.conftest import ROOT, ServerProcess, start_server
from tests.e2e.test_billing_e2e import (
    ADMIN_TOKEN,
    Admin,
    billing_env,
    cleanup_redis,
    run_sync,
    with_redis_db,
)

CONFIG = ROOT / "deploy" / "haproxy" / "streamgate.cfg"
NODE_HOSTS = ("127.0.0.2", "127.0.0.3")
LB_HOST = "127.0.0.1"
# Health checks every 100 ms; one failed check takes a node out, two passed bring it back:
# a node that went unready is out within CHECK_BOUND_S.
CHECK_INTER_MS = 100
CHECK_FALL = 1
CHECK_RISE = 2
CHECK_BOUND_S = 2.0  # CHECK_INTER_MS x CHECK_FALL plus a check's own timeout, with slack
WORKERS_PER_NODE = 2  # each node is a supervisor and its workers, as in production

__all__ = ["CHECK_BOUND_S", "Balancer", "LoadBalanced", "Node", "haproxy_binary",
           "load_balanced"]


def haproxy_binary() -> str:
    for found in (shutil.which("haproxy"), "/usr/sbin/haproxy"):
        if found and Path(found).is_file():
            return found
    raise RuntimeError("haproxy not found: install the Debian package `haproxy` "
                       "(scripts/setup.sh does)")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(*hosts: str) -> int:
    """A port free on every one of `hosts` (the nodes share their port numbers)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind((hosts[0], 0))
            port = int(sock.getsockname()[1])
        if all(_bindable(h, port) for h in hosts[1:]):
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


@dataclass
class Node:
    name: str  # HAProxy's name for it: node-a, node-b
    host: str
    ws_port: int
    http_port: int
    env: dict[str, str]
    server: ServerProcess | None = None

    @property
    def ws(self) -> str:
        return f"ws://{self.host}:{self.ws_port}"

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def start(self) -> None:
        self.server = start_server(self.env, workers=WORKERS_PER_NODE)

    def stop(self) -> int:
        return 0 if self.server is None else self.server.stop(30)

    def logs(self) -> list[str]:
        return [] if self.server is None else list(self.server.stderr_lines)


@dataclass
class Balancer:
    proc: subprocess.Popen[str]
    ws_port: int
    http_port: int
    stats_socket: Path
    output: list[str] = field(default_factory=list)

    @property
    def ws(self) -> str:
        return f"ws://{LB_HOST}:{self.ws_port}"

    @property
    def http(self) -> str:
        return f"http://{LB_HOST}:{self.http_port}"

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> UP / DOWN / ... from `show stat`; a server whose first check
        has not run yet is INI (HAProxy shows it UP meanwhile)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {(r["pxname"], r["svname"]):
                "INI" if r["check_status"] == "INI" else r["status"].split(" ")[0]
                for r in rows if r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_for(self, server: str, status: str, timeout: float = 10.0) -> float:
        """Wait until `server` has `status` in both backends; returns the time it took."""
        started = time.monotonic()
        while True:
            states = self.states()
            if all(states[(backend, server)] == status for backend in ("ws_nodes", "http_nodes")):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{server} not {status} after {timeout} s: {states}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_balancer(nodes: list[Node], workdir: Path) -> Balancer:
    ws_port, http_port = free_port(LB_HOST), free_port(LB_HOST)
    stats = workdir / "haproxy.sock"
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "SG_LB_ADDR": LB_HOST, "SG_LB_WS_PORT": str(ws_port),
        "SG_LB_HTTP_PORT": str(http_port),
        "SG_NODE_A": nodes[0].host, "SG_NODE_B": nodes[1].host,
        "SG_WS_PORT": str(nodes[0].ws_port), "SG_HTTP_PORT": str(nodes[0].http_port),
        "SG_CHECK_INTER": f"{CHECK_INTER_MS}ms", "SG_CHECK_FALL": str(CHECK_FALL),
        "SG_CHECK_RISE": str(CHECK_RISE), "SG_STATS_SOCKET": str(stats),
        "SG_MAXCONN": "4000",  # within the test process's descriptor limit
    }
    # -db: foreground, no daemon; -W would add a master process we do not need.
    proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(CONFIG)], cwd=workdir, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    balancer = Balancer(proc, ws_port, http_port, stats)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            balancer.output.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 10
    while not stats.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            balancer.stop()
            raise RuntimeError("haproxy did not start:\n" + "\n".join(balancer.output))
        time.sleep(0.02)
    return balancer


@dataclass
class LoadBalanced:
    nodes: list[Node]
    balancer: Balancer
    admin: Admin  # through the balancer
    redis_url: str
    dsn: str

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)


@contextlib.contextmanager
def load_balanced(redis_url: str, database_url: str, redis_db: int, workdir: Path,
                  **extra: Any) -> Iterator[LoadBalanced]:
    """Two billing-enabled nodes (config as for billing_env, plus `extra`) on one Redis
    logical database and one fresh PostgreSQL database, behind HAProxy. On exit: the nodes
    still running are stopped (exit 0 asserted), HAProxy too, Redis and the database cleaned."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = run_sync(create_database(database_url, name))
    rurl = with_redis_db(redis_url, redis_db)
    ws_port, http_port = free_port(*NODE_HOSTS), free_port(*NODE_HOSTS)
    deployment = f"lb-test-{uuid.uuid4().hex[:8]}"
    nodes = [
        Node(f"node-{letter}", host, ws_port, http_port, {
            **billing_env(rurl, dsn, **extra),
            "STREAMGATE_SERVER__HOST": host,
            "STREAMGATE_SERVER__WS_PORT": str(ws_port),
            "STREAMGATE_SERVER__HTTP_PORT": str(http_port),
            "STREAMGATE_DEPLOYMENT_ID": deployment,
        })
        for letter, host in zip("ab", NODE_HOSTS, strict=True)
    ]
    balancer: Balancer | None = None
    admin = Admin("", ADMIN_TOKEN)
    codes: dict[str, int] = {}
    try:
        for node in nodes:  # one after the other: both bootstrap the same database
            node.start()
        balancer = start_balancer(nodes, workdir)
        for node in nodes:
            balancer.wait_for(node.name, "UP")
        admin.base = balancer.http
        yield LoadBalanced(nodes, balancer, admin, rurl, dsn)
        codes = {node.name: node.stop() for node in nodes}
    finally:
        try:
            if balancer is not None:
                balancer.stop()
            for node in nodes:
                node.stop()
            run_sync(cleanup_redis(rurl, admin.tenants, admin.key_ids))
        finally:
            run_sync(drop_database(database_url, name))
    bad = {n: c for n, c in codes.items() if c != 0}
    assert not bad, {n: nodes[i].logs()[-20:] for i, n in enumerate(codes) if n in bad}
