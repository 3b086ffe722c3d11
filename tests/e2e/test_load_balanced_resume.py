"""A node leaves, its sessions do not (issue 13 item 5): 50 live ASR sessions through a real
HAProxy in front of two nodes (each a supervisor with two workers: tests/haproxy.py). One node
is drained (SIGTERM) or killed outright (SIGKILL to every process of it); every session either
finishes where it was or resumes on the other node through the same balancer address
(docs/protocol.md, "Resuming a session"), every final arrives exactly once, and the audio is
billed once: exactly, after a drain; never twice and short by at most one usage interval of
what the dead node took in, after a kill."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from streamgate_client.asr_client import stream_audio
from streamgate_protocol import messages as m
from tests.e2e.test_asr_resume import lease_units, phrases
from tests.e2e.test_billing_e2e import Tenant, assert_books_balance
from tests.haproxy import LoadBalanced, Node, load_balanced

pytestmark = pytest.mark.e2e
REDIS_DB = 11  # test_load_balanced's: the modules run one after the other, each cleans up
SESSIONS = 50
BYTES_PER_MS = 32
USAGE_INTERVAL_MS = 500  # billing_env's asr.session.usage_interval_s


@pytest.fixture
def lb(redis_url: str, database_url: str, tmp_path: Path) -> Iterator[LoadBalanced]:
    with load_balanced(redis_url, database_url, REDIS_DB, tmp_path,
                       billing__lease_s=2, billing__min_lease_s=2,
                       server__idle_timeout_s=10, server__drain_timeout_s=0.5,
                       server__drain_notice_s=1) as env:
        yield env


@dataclass
class Client:
    """One session's view: every message, and when each `ready` came."""

    messages: list[object] = field(default_factory=list)
    readies: list[float] = field(default_factory=list)

    def seen(self, msg: object) -> None:
        self.messages.append(msg)
        if isinstance(msg, m.Ready):
            self.readies.append(time.monotonic())

    @property
    def session_id(self) -> str:
        return next(msg.session_id for msg in self.messages if isinstance(msg, m.Ready))

    def finals(self) -> list[int]:
        return [msg.utterance_id for msg in self.messages
                if isinstance(msg, m.Transcript) and msg.is_final]

    def summaries(self) -> list[m.Summary]:
        return [msg for msg in self.messages if isinstance(msg, m.Summary)]

    def resumed(self) -> bool:
        return any(isinstance(msg, m.Ready) and msg.resumed for msg in self.messages)


async def stream_all(lb: LoadBalanced, tenant: Tenant, audio: bytes,
                     cut: Node, how: signal.Signals) -> tuple[list[Client], float]:
    """SESSIONS clients streaming `audio` in real time through the balancer; once every one has
    had a final, the node `cut` gets `how`. Returns the clients and when the cut happened."""
    clients = [Client() for _ in range(SESSIONS)]
    tasks = [asyncio.create_task(stream_audio(
        f"{lb.balancer.ws}/v1/asr/stream", audio, encoding="pcm_s16le", sample_rate=16000,
        key=tenant.key, realtime=True, chunk_ms=100, on_event=client.seen,
        extra_params={"model": "synthetic", "interim_results": "false"}))
        for client in clients]
    async with asyncio.timeout(30):
        while not all(c.finals() for c in clients):  # noqa: ASYNC110 - 50 streams to watch
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.7)  # into the next utterance: the cut lands mid-speech
    assert cut.server is not None
    cut_at = time.monotonic()
    if how == signal.SIGKILL:
        kill_node(cut.server.proc.pid)
    else:
        cut.server.proc.send_signal(how)
    async with asyncio.timeout(60):
        await asyncio.gather(*tasks)
    return clients, cut_at


def kill_node(supervisor_pid: int) -> None:
    """The whole node at once, as a machine that dies: its workers first (so none drains),
    then the supervisor, then anything else of it (engine worker processes)."""
    everything = descendants(supervisor_pid)
    for pid in [*everything, supervisor_pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            child = int(entry.name)
            found += [child, *descendants(child)]
    return found


def sessions_on(node: Node) -> set[str]:
    return {line.split('"session_id":"')[1].split('"')[0] for line in node.logs()
            if '"msg":"session started"' in line and '"session_id":"' in line}


def assert_exactly_once(clients: list[Client]) -> None:
    for client in clients:
        ids = client.finals()
        assert ids == list(range(1, len(ids) + 1)), ids  # in order, none twice, none missing
        assert len(ids) >= 4, ids


def test_sigterm_a_node_every_session_finishes_or_resumes_billed_exactly_once(
        lb: LoadBalanced) -> None:
    tenant = lb.admin.tenant(funded=50_000_000)
    audio = phrases()
    node_a = lb.node("node-a")

    clients, _ = asyncio.run(stream_all(lb, tenant, audio, node_a, signal.SIGTERM))
    assert node_a.server is not None and node_a.server.proc.wait(30) == 0
    on_a = sessions_on(node_a)
    moved = [c for c in clients if c.session_id in on_a]
    assert moved, "the balancer put sessions on both nodes"
    assert all(c.resumed() for c in moved)  # drained on A, resumed on B
    assert not any(c.resumed() for c in clients if c not in moved)
    assert_exactly_once(clients)
    total_ms = len(audio) // BYTES_PER_MS
    charged = 0
    for client in clients:
        summaries = client.summaries()
        assert len(summaries) == (2 if client in moved else 1)
        assert abs(sum(s.billed_ms for s in summaries) - total_ms) <= 2 * len(summaries)
        charged += sum(s.cost_micros for s in summaries)
    asyncio.run(assert_books_balance(lb.dsn, lb.redis_url, tenant.tenant_id,
                                     expected_usage=charged, check_reconcile=False,
                                     timeout=30))


def test_sigkill_a_node_every_session_resumes_within_2_s_never_billed_twice(
        lb: LoadBalanced) -> None:
    tenant = lb.admin.tenant(funded=50_000_000)
    audio = phrases()
    node_b = lb.node("node-b")

    clients, killed_at = asyncio.run(stream_all(lb, tenant, audio, node_b, signal.SIGKILL))
    on_b = sessions_on(node_b)
    moved = [c for c in clients if c.session_id in on_b]
    assert moved, "the balancer put sessions on both nodes"
    for client in moved:
        assert client.resumed()
        assert client.readies[-1] - killed_at < 2.0, client.readies[-1] - killed_at
    assert_exactly_once(clients)
    total_ms = len(audio) // BYTES_PER_MS
    for client in moved:
        [summary] = client.summaries()  # the dead node sent none
        charged_b = asyncio.run(lease_units(lb.redis_url, lb.dsn, tenant.tenant_id,
                                            client.session_id))
        billed = charged_b + summary.billed_ms
        assert billed <= total_ms + 2, (charged_b, summary)  # never twice
        assert billed >= total_ms - USAGE_INTERVAL_MS - 400, (charged_b, summary, total_ms)
    node_b.server = None  # nothing left of it to stop
