"""The SessionHost port (server/sessions/host.py): what a runner and a call need of the process
hosting them. WsServer is one host; the admission policy reaches a call through its endpoint,
not through the listener's router."""

from __future__ import annotations

import asyncio

from server.billing.auth import Principal
from server.protocol.errors import Rejected, refuse
from tests.unit.test_telephony_call import START, open_call
from tests.unit.virtual_time import run


class RefuseEveryone:
    def __init__(self) -> None:
        self.asked: list[Principal] = []

    async def check_upgrade(self, principal: Principal) -> Rejected | None:
        self.asked.append(principal)
        return refuse("rate_limited", "too many calls")


def test_a_key_that_comes_in_band_meets_the_policy_the_endpoint_was_given() -> None:
    async def scenario() -> None:
        call = await open_call(principal_in_upgrade=False)
        policy = RefuseEveryone()
        call.endpoint.policy = policy
        assert call.server.router.policy is None  # only the endpoint's policy can refuse it
        call.session.on_text(START)
        for _ in range(100):
            if call.conn.close_code is not None:
                break
            await asyncio.sleep(0.01)
        assert call.conn.close_code == 4029
        assert len(policy.asked) == 1
        await call.end()

    run(scenario())


def test_the_listener_counts_a_call_once_through_the_port() -> None:
    async def scenario() -> None:
        call = await open_call()
        server = call.server
        assert server.session_count == 1  # the accepted socket is a call from the start
        call.session.on_text(START)  # its ASR runner starts: part of the call, not a session
        for _ in range(100):
            if call.session.state == "live":
                break
            await asyncio.sleep(0.01)
        assert call.session.state == "live"
        assert server.session_count == 1
        active = call.endpoint.metrics.sessions_active
        assert active.labels("telephony")._value.get() == 1
        assert active.labels("asr")._value.get() == 0  # not a second session of its own
        await call.end()
        assert server.session_count == 0
        assert active.labels("telephony")._value.get() == 0

    run(scenario())
