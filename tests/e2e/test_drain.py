"""SIGTERM as a load balancer sees it: /readyz and upgrades answer 503 `draining` for the whole
drain window (the live sessions' drain, and at least `server.drain_notice_s`), the listeners
close at its end, never before, and each phase is logged."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

from tests.e2e.conftest import TEST_KEY, ServerProcess, espeak_pcm16, silence, start_server
from tests.e2e.test_asr_stream import drain_to_close, recv_json, stream_with_credit

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
PHASES = ["drain started", "drain: sessions ended", "drain: closing listeners",
          "drain: listeners closed", "drain complete"]
REFUSED = "refused"


def messages(srv: ServerProcess) -> list[str]:
    return [str(line.get("message", line.get("msg", ""))) for line in srv.logs()]


async def wait_logged(srv: ServerProcess, message: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while message not in messages(srv):  # noqa: ASYNC110 - a thread reads stderr
            await asyncio.sleep(0.02)


async def sample_readyz(http: aiohttp.ClientSession, srv: ServerProcess) -> str:
    try:
        async with http.get(f"{srv.http}/readyz") as resp:
            body = await resp.json()
            return f"{resp.status} {body.get('reason', '')}"
    except aiohttp.ClientConnectionError:
        return REFUSED


async def sample_upgrade(srv: ServerProcess) -> str:
    try:
        async with connect(f"{srv.ws}/v1/asr/stream", additional_headers=AUTH,
                           open_timeout=5):
            return "101"
    except InvalidStatus as exc:
        body = json.loads(exc.response.body or b"{}")
        return f"{exc.response.status_code} {body.get('error', {}).get('code', '')}"
    except (OSError, InvalidMessage):
        # InvalidMessage: accepted into the backlog as the listener closed, then reset.
        return REFUSED


def check_sequence(name: str, samples: list[tuple[str, bool]]) -> None:
    """503 `draining` while the listener is open, then refused for good, and the refusal only
    once the server said it closes its listeners."""
    outcomes = [outcome for outcome, _ in samples]
    first_refused = outcomes.index(REFUSED) if REFUSED in outcomes else len(outcomes)
    assert first_refused > 0, f"{name}: refused at once"
    assert set(outcomes[:first_refused]) == {"503 draining"}, f"{name}: {outcomes}"
    assert set(outcomes[first_refused:]) <= {REFUSED}, f"{name}: {outcomes}"
    assert all(logged for _, logged in samples[first_refused:]), \
        f"{name}: refused before the listeners were due to close"


async def test_drain_window_is_visible_to_a_load_balancer() -> None:
    # Longer than the live session holds the drain (0.5 s of running on, then 1.5-4.5 s for
    # its finals here).
    notice_s = 7.0
    srv = start_server({"STREAMGATE_SERVER__DRAIN_TIMEOUT_S": "0.5",
                        "STREAMGATE_SERVER__DRAIN_NOTICE_S": str(notice_s)})
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
                connect(f"{srv.ws}/v1/asr/stream?model=synthetic-stuck",
                        additional_headers=AUTH) as live:
            assert await sample_readyz(http, srv) == "200 "
            # A slow engine keeps this session's finals pending: it holds the drain open.
            ready = await recv_json(live)
            seen: list[dict[str, Any]] = []
            await stream_with_credit(live, silence(300) + espeak_pcm16("hold the drain"),
                                     ready, seen)
            srv.proc.send_signal(signal.SIGTERM)
            await wait_logged(srv, "drain started")
            live_done = asyncio.create_task(drain_to_close(live))
            readyz: list[tuple[str, bool]] = []
            upgrades: list[tuple[str, bool]] = []
            after_session: int = 0
            deadline = time.monotonic() + 30
            while srv.proc.poll() is None or REFUSED not in {readyz[-1][0], upgrades[-1][0]}:
                assert time.monotonic() < deadline, "server did not exit"
                r, u = await sample_readyz(http, srv), await sample_upgrade(srv)
                closing = "drain: closing listeners" in messages(srv)
                if REFUSED in (r, u) and not closing:
                    # The log line is written before the close; give stderr a moment to arrive.
                    await asyncio.sleep(0.5)
                    closing = "drain: closing listeners" in messages(srv)
                readyz.append((r, closing))
                upgrades.append((u, closing))
                if live_done.done() and u != REFUSED:
                    after_session += 1
                await asyncio.sleep(0.05)
            seen += await live_done
            assert live.close_code == 1001
        check_sequence("readyz", readyz)
        check_sequence("upgrade", upgrades)
        # The window outlived the session: 503s kept coming after it had closed.
        assert after_session >= 3, upgrades
        assert srv.proc.wait(10) == 0
        types = [m["type"] for m in seen]
        assert types[-2:] == ["summary", "error"] and seen[-1]["code"] == "draining"
        logged = messages(srv)
        assert [m for m in logged if m in PHASES] == PHASES
        assert not any("Traceback" in line for line in srv.stderr_lines)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


async def test_each_kind_runs_on_for_its_own_drain_timeout() -> None:
    """A resumable stream is told to drain after `drain_timeout_s`; a phone call, which cannot
    resume, keeps running up to `telephony_drain_timeout_s`, then ends with 1001."""
    from tests.e2e.test_telephony_e2e import Peer

    srv = start_server({"STREAMGATE_SERVER__DRAIN_TIMEOUT_S": "0.3",
                        "STREAMGATE_SERVER__TELEPHONY_DRAIN_TIMEOUT_S": "4",
                        "STREAMGATE_SERVER__DRAIN_NOTICE_S": "0.2"})
    try:
        async with connect(f"{srv.ws}/v1/asr/stream?model=synthetic",
                           additional_headers=AUTH) as stream:
            await recv_json(stream)
            call = await Peer.open(srv, "?provider=twilio", headers=AUTH)
            await call.start()  # media every 20 ms from here: the call is live and busy
            await wait_for_log(srv, "call started")
            srv.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            seen = await drain_to_close(stream, timeout=10)
            stream_closed = time.monotonic() - t0
            assert stream.close_code == 1001 and seen[-1]["code"] == "draining"
            assert call.ws.close_code is None  # the call goes on after the stream was drained
            async with asyncio.timeout(20):
                await call.ws.wait_closed()
            call_closed = time.monotonic() - t0
            assert call.ws.close_code == 1001
            await call.close()
        assert stream_closed < 3.0, stream_closed
        assert 3.5 <= call_closed < 15.0, call_closed
        assert srv.proc.wait(20) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


async def wait_for_log(srv: ServerProcess, message: str, timeout: float = 10.0) -> None:
    await wait_logged(srv, message, timeout)
