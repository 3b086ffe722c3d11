"""A second `streamgate serve` on the ports of a running one is refused by name, and the first
is unaffected; processes of one deployment (STREAMGATE_DEPLOYMENT_ID) may share the ports, and
the workers of one supervisor (`--workers N`) are such a deployment, of their own."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import urllib.request

import pytest
from websockets.asyncio.client import connect

from tests.e2e.conftest import HERE, ROOT, TEST_KEY, ServerProcess, start_server, wait_for

pytestmark = pytest.mark.e2e


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ports_env(ws_port: int, http_port: int, **extra: str) -> dict[str, str]:
    return {"STREAMGATE_SERVER__WS_PORT": str(ws_port),
            "STREAMGATE_SERVER__HTTP_PORT": str(http_port), **extra}


def run_second(env: dict[str, str], workers: int = 1) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "serve", "--config", str(HERE / "server.toml"),
         "--workers", str(workers)],
        cwd=ROOT, env={**os.environ, "STREAMGATE_STRICT_TASKS": "1", **env},
        capture_output=True, text=True, timeout=60,
    )


def readyz(srv: ServerProcess) -> str:
    with urllib.request.urlopen(f"{srv.http}/readyz", timeout=5) as resp:
        return str(json.load(resp)["status"])


async def assert_serves(srv: ServerProcess) -> None:
    assert await asyncio.to_thread(readyz, srv) == "ready"
    async with connect(f"{srv.ws}/v1/asr/stream",
                       additional_headers={"Authorization": f"Bearer {TEST_KEY}"}) as ws:
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready"


def stop_cleanly(srv: ServerProcess) -> None:
    code = srv.stop()
    assert code == 0, "\n".join(srv.stderr_lines[-30:])


async def test_second_server_on_the_same_ports_is_refused() -> None:
    ws_port, http_port, other_http = free_ports(3)
    first = start_server(ports_env(ws_port, http_port))
    try:
        await assert_serves(first)
        second = run_second(ports_env(ws_port, http_port))
        assert second.returncode != 0
        assert (f"streamgate: port {ws_port} is already served by streamgate pid "
                f"{first.proc.pid}") in second.stderr
        assert "Traceback" not in second.stderr
        assert second.stdout == ""  # it never announced itself as listening
        # The HTTP port alone is enough to be refused, by its own number.
        third = run_second(ports_env(free_ports(1)[0], http_port))
        assert third.returncode != 0
        assert (f"port {http_port} is already served by streamgate pid "
                f"{first.proc.pid}") in third.stderr
        # And the WebSocket port alone as well.
        fourth = run_second(ports_env(ws_port, other_http))
        assert fourth.returncode != 0 and f"port {ws_port} is already served" in fourth.stderr
        await assert_serves(first)  # the first never noticed
        assert first.proc.poll() is None
    finally:
        stop_cleanly(first)
    assert not any("Traceback" in line for line in first.stderr_lines)


async def test_workers_of_one_deployment_share_the_ports() -> None:
    ws_port, http_port = free_ports(2)
    env = ports_env(ws_port, http_port, STREAMGATE_DEPLOYMENT_ID="deploy-blue")
    first = start_server(env)
    try:
        worker = start_server(env)  # a worker of the same deployment: allowed, both listen
        try:
            assert (worker.ws_port, worker.http_port) == (ws_port, http_port)
            await assert_serves(first)
            stranger = run_second(ports_env(ws_port, http_port,
                                            STREAMGATE_DEPLOYMENT_ID="deploy-green"))
            assert stranger.returncode != 0
            assert f"port {ws_port} is already served by streamgate pid" in stranger.stderr
        finally:
            stop_cleanly(worker)
        await assert_serves(first)
    finally:
        stop_cleanly(first)


async def test_a_second_supervisor_is_refused_while_the_first_ones_workers_share() -> None:
    ws_port, http_port = free_ports(2)
    first = start_server(ports_env(ws_port, http_port), workers=2)
    try:
        wait_for(lambda: sum(line.get("msg") == "worker listening"
                             for line in first.logs()) == 2)
        # The supervisor holds both claims; its two workers joined them.
        second = run_second(ports_env(ws_port, http_port), workers=2)
        assert second.returncode == 2
        assert (f"streamgate: port {ws_port} is already served by streamgate pid "
                f"{first.proc.pid}") in second.stderr
        assert second.stdout == "" and "Traceback" not in second.stderr
        assert "worker started" not in second.stderr  # refused before it started anything
        # Nor does a single process get in, even one claiming some deployment id: the
        # supervisor's is fresh and secret.
        single = run_second(ports_env(ws_port, http_port, STREAMGATE_DEPLOYMENT_ID="guess"))
        assert single.returncode == 2
        assert f"port {ws_port} is already served by streamgate pid {first.proc.pid}" \
            in single.stderr
        for _ in range(4):  # new connections: each is hashed to a worker
            await assert_serves(first)
    finally:
        stop_cleanly(first)
    assert not any("Traceback" in line for line in first.stderr_lines)


def readyz_at(host: str, http_port: int) -> int:
    with urllib.request.urlopen(f"http://{host}:{http_port}/readyz", timeout=5) as resp:
        return int(resp.status)


async def test_supervisors_of_one_named_deployment_share_a_host() -> None:
    """Two nodes on one host (distinct loopback addresses, the same ports), as the load-balanced
    tests run them: an operator-set STREAMGATE_DEPLOYMENT_ID makes both supervisors members."""
    ws_port, http_port = free_ports(2)
    nodes = []
    try:
        for host in ("127.0.0.2", "127.0.0.3"):
            nodes.append(start_server(ports_env(ws_port, http_port, STREAMGATE_SERVER__HOST=host,
                                                STREAMGATE_DEPLOYMENT_ID="two-nodes"),
                                      workers=2))
        for host in ("127.0.0.2", "127.0.0.3"):
            assert await asyncio.to_thread(readyz_at, host, http_port) == 200
        stranger = run_second(ports_env(ws_port, http_port, STREAMGATE_SERVER__HOST="127.0.0.2"),
                              workers=2)
        assert stranger.returncode == 2
        assert f"port {ws_port} is already served by streamgate pid" in stranger.stderr
    finally:
        for node in nodes:
            stop_cleanly(node)
