"""`streamgate serve --workers 2`: a supervisor and two worker processes sharing both ports
through SO_REUSEPORT. Sessions land on both workers and /metrics shows the whole node; a worker
killed with SIGKILL is restarted while the other keeps serving; SIGTERM drains every worker and
everything exits 0; one admin token, one dev key and one pair of embedded stores for the node.
(`--workers 1` is what every other e2e test runs.)"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.e2e.conftest import TEST_KEY, ServerProcess, start_server
from tests.e2e.test_asr_stream import drain_to_close, recv_json, stream_with_credit
from tests.speech import espeak_pcm16, silence

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
# SO_REUSEPORT picks a worker by a hash of the connection's addresses: with 16 connections the
# chance that all land on one of two workers is 2 * 2**-16.
SPREAD_SESSIONS = 16
SAMPLES = 12


def log_messages(srv: ServerProcess, message: str) -> list[dict[str, Any]]:
    return [line for line in srv.logs() if line.get("msg") == message]


def worker_pids(srv: ServerProcess) -> dict[int, int]:
    """Worker index -> pid of its latest process, from the supervisor's `worker listening`."""
    return {int(str(e["worker"])): int(str(e["pid"]))
            for e in log_messages(srv, "worker listening")}


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not in {timeout} s: {what}"
        time.sleep(0.05)


def start_node(extra_env: dict[str, str] | None = None) -> ServerProcess:
    srv = start_server(extra_env, workers=2)
    # The node printed `listening` after both workers did; their log lines may still be on
    # their way through the stderr pump.
    wait_until(lambda: len(worker_pids(srv)) == 2, 5, "two workers logged as listening")
    return srv


def http_get(srv: ServerProcess, path: str, token: str | None = None) -> tuple[int, str]:
    """A new connection per call (urllib does not keep connections): each one is hashed to a
    worker afresh."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(srv.http + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(metrics: str, name: str) -> dict[str, float]:
    """`name{labels} value` lines of a Prometheus text page, keyed by their label text."""
    out = {}
    for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", metrics, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


def pid_label(labels: str) -> int:
    found = re.search(r'pid="(\d+)"', labels)
    assert found is not None, labels
    return int(found.group(1))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_node(srv: ServerProcess) -> None:
    pids = list(worker_pids(srv).values())
    code = srv.stop(timeout=20)
    assert code == 0, "\n".join(srv.stderr_lines[-40:])
    assert not [pid for pid in pids if alive(pid)]
    assert not any("Traceback" in line for line in srv.stderr_lines)


@pytest.fixture(scope="module")
def node() -> Iterator[ServerProcess]:
    srv = start_node()
    yield srv
    stop_node(srv)


async def open_sessions(stack: AsyncExitStack, srv: ServerProcess, n: int,
                        query: str = "", headers: dict[str, str] | None = None,
                        ) -> list[tuple[ClientConnection, dict[str, Any]]]:
    async def one() -> tuple[ClientConnection, dict[str, Any]]:
        ws = await stack.enter_async_context(
            connect(f"{srv.ws}/v1/asr/stream{query}", additional_headers=headers or AUTH))
        ready = await recv_json(ws)
        assert ready["type"] == "ready", ready
        return ws, ready

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_sessions_land_on_both_workers_and_metrics_show_the_node(
        node: ServerProcess) -> None:
    assert node.proc.poll() is None
    pids = worker_pids(node)
    assert len(pids) == 2 and node.proc.pid not in pids.values()
    async with AsyncExitStack() as stack:
        await open_sessions(stack, node, SPREAD_SESSIONS)
        # Whichever worker answers the scrape, it reports both workers' live sessions.
        for _ in range(4):
            _, page = await asyncio.to_thread(http_get, node, "/metrics")
            active = samples(page, "streamgate_sessions_active")
            per_pid = {pid_label(k): v for k, v in active.items() if 'kind="asr"' in k}
            assert sum(per_pid.values()) == SPREAD_SESSIONS, active
            assert set(per_pid) <= set(pids.values())
            assert len([v for v in per_pid.values() if v > 0]) == 2, per_pid
        # Gauges computed by scrape hooks are one series for the node (summed over workers).
        depth = samples(page, "streamgate_queue_depth_ms")
        assert set(depth) == {'{stage="ingest"}', '{stage="invoke"}', '{stage="tts_out"}'}, \
            depth
    # Counters add up over the workers: every session ended is counted once.
    _, page = await asyncio.to_thread(http_get, node, "/metrics")
    ended = samples(page, "streamgate_sessions_total")
    assert sum(v for k, v in ended.items() if 'kind="asr"' in k) >= SPREAD_SESSIONS


async def test_a_killed_worker_is_restarted_and_the_node_keeps_serving(
        node: ServerProcess) -> None:
    before = worker_pids(node)
    victim = before[0]
    restarts = len(log_messages(node, "worker restarting"))
    os.kill(victim, signal.SIGKILL)
    # Connections the kernel queued on the victim's socket before it died are reset (the
    # SO_REUSEPORT group has no hand-over); from its death on, the other worker takes them all.
    await asyncio.to_thread(
        wait_until, lambda: any(e["pid"] == victim for e in log_messages(node, "worker exited")),
        5, "the supervisor saw the worker die")
    async with AsyncExitStack() as stack:
        await open_sessions(stack, node, 6)
    await asyncio.to_thread(wait_until, lambda: worker_pids(node)[0] != victim, 15,
                            "worker 0 restarted")
    exited = [e for e in log_messages(node, "worker exited") if e["pid"] == victim]
    assert exited and exited[0]["signal"] == "SIGKILL" and exited[0]["level"] == "warning"
    assert len(log_messages(node, "worker restarting")) == restarts + 1
    after = worker_pids(node)
    assert after[1] == before[1] and not alive(victim)
    _, page = await asyncio.to_thread(http_get, node, "/metrics")
    assert f'pid="{victim}"' not in page  # its live gauges left with it
    async with AsyncExitStack() as stack:
        await open_sessions(stack, node, SPREAD_SESSIONS)
        _, page = await asyncio.to_thread(http_get, node, "/metrics")
        live = {k: v for k, v in samples(page, "streamgate_sessions_active").items() if v > 0}
        assert {pid_label(k) for k in live} == set(after.values()), live


async def sample_upgrade(srv: ServerProcess) -> str:
    try:
        async with connect(f"{srv.ws}/v1/asr/stream", additional_headers=AUTH, open_timeout=5):
            return "101"
    except InvalidStatus as exc:
        body = json.loads(exc.response.body or b"{}")
        return f"{exc.response.status_code} {body.get('error', {}).get('code', '')}"


async def test_sigterm_drains_every_worker_and_everything_exits() -> None:
    # The whole drain window as notice: sampling must not race the listeners' close. A second
    # SIGTERM, forwarded like the first, ends it once the samples are taken.
    srv = start_node({"STREAMGATE_SERVER__DRAIN_NOTICE_S": "5.0",
                      "STREAMGATE_SERVER__DRAIN_TIMEOUT_S": "0.2"})  # drained before idle
    pids = list(worker_pids(srv).values())
    speech = silence(300) + espeak_pcm16("finish me before you go")
    try:
        async with AsyncExitStack() as stack:
            # A slow engine keeps finals pending: the live sessions hold the drain open.
            live = await open_sessions(stack, srv, 8, query="?model=synthetic-slow")
            seen: list[list[dict[str, Any]]] = [[] for _ in live]
            await asyncio.gather(*(stream_with_credit(ws, speech, ready, s)
                                   for (ws, ready), s in zip(live, seen, strict=True)))
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_until,
                                    lambda: len(log_messages(srv, "drain started")) == 2, 5,
                                    "both workers draining")
            ends = [asyncio.create_task(drain_to_close(ws)) for ws, _ in live]
            # Every worker is out of rotation: new connections hash to either of them.
            readyz = [await asyncio.to_thread(http_get, srv, "/readyz") for _ in range(SAMPLES)]
            assert {status for status, _ in readyz} == {503}, readyz
            assert all(json.loads(body)["reason"] == "draining" for _, body in readyz)
            upgrades = [await sample_upgrade(srv) for _ in range(SAMPLES)]
            assert set(upgrades) == {"503 draining"}, upgrades
            for (ws, _), s, end in zip(live, seen, ends, strict=True):
                s += await end
                assert ws.close_code == 1001
                assert [m["type"] for m in s][-2:] == ["summary", "error"], s[-3:]
                assert any(m["type"] == "transcript" and m["is_final"] for m in s), s
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(20)
        assert code == 0, "\n".join(srv.stderr_lines[-40:])
        assert not [pid for pid in pids if alive(pid)]
        exits = log_messages(srv, "worker exited")
        assert sorted(e["pid"] for e in exits) == sorted(pids)
        assert {e["code"] for e in exits} == {0}
        assert log_messages(srv, "supervisor exited")[0]["code"] == 0
        assert not any("Traceback" in line for line in srv.stderr_lines)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


def read_events(srv: ServerProcess, count: int) -> dict[str, dict[str, Any]]:
    """The JSON lines the node printed on stdout after `listening`."""
    assert srv.proc.stdout is not None
    out = {}
    for _ in range(count):
        event = json.loads(srv.proc.stdout.readline())
        out[event["event"]] = event
    return out


@pytest.fixture
def embedded_node(tmp_path: Path) -> Iterator[ServerProcess]:
    """Billing on, no store URLs and no admin token configured: the supervisor starts one
    embedded Redis and PostgreSQL, makes the token and the dev key, and hands them over."""
    srv = start_node({
        "STREAMGATE_BILLING__ENABLED": "true",
        "STREAMGATE_BILLING__DATA_DIR": str(tmp_path),
        "STREAMGATE_BILLING__EMBEDDED_REDIS_PORT": "0",
        "STREAMGATE_BILLING__EMBEDDED_POSTGRES_PORT": "0",
        "STREAMGATE_BILLING__DEV_TENANT": "true",
        "REDIS_URL": "", "DATABASE_URL": "",
    })
    yield srv
    stop_node(srv)


def children(pid: int) -> list[str]:
    """Command names of the direct children of `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.rpartition(")")
        if int(rest.split()[1]) == pid:
            out.append(name.partition("(")[2])
    return out


async def test_one_admin_token_one_dev_key_one_pair_of_stores(
        embedded_node: ServerProcess) -> None:
    srv = embedded_node
    events = read_events(srv, 2)
    token = events["admin_token"]["admin_token"]
    dev_key = events["dev_api_key"]["api_key"]
    # Any mismatch between the workers would fail about half of these calls.
    answers = [await asyncio.to_thread(http_get, srv, "/admin/tenants/dev", token)
               for _ in range(2 * SAMPLES)]
    assert {status for status, _ in answers} == {200}, answers
    assert (await asyncio.to_thread(http_get, srv, "/admin/tenants/dev", "wrong"))[0] == 401
    async with AsyncExitStack() as stack:
        await open_sessions(stack, srv, SPREAD_SESSIONS,
                            headers={"Authorization": f"Bearer {dev_key}"})
    # The stores are the supervisor's children, once; the workers started none.
    kids = children(srv.proc.pid)
    assert kids.count("redis-server") == 1 and kids.count("postgres") == 1, kids
    for pid in worker_pids(srv).values():
        assert not {"redis-server", "postgres"} & set(children(pid))


async def test_workers_of_a_killed_supervisor_drain_and_exit() -> None:
    srv = start_node()
    pids = list(worker_pids(srv).values())
    try:
        srv.proc.kill()  # no signal to forward: the workers see their lifeline pipe end
        srv.proc.wait(5)
        await asyncio.to_thread(wait_until, lambda: not any(alive(p) for p in pids), 15,
                                "the orphaned workers exited")
        drained = [line for line in srv.logs() if line.get("msg") == "drain complete"]
        assert len(drained) == 2, "\n".join(srv.stderr_lines[-30:])
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_that_cannot_start_stops_the_node() -> None:
    # Valid configuration, but the engine refuses it when the worker starts it.
    with pytest.raises(RuntimeError, match=r"did not start \(exit 1\)") as failed:
        start_node({"STREAMGATE_ASR__MODELS__SPHINX-EN__LANGUAGE": "xx-XX"})
    assert "worker failed before the node was up" in str(failed.value)
