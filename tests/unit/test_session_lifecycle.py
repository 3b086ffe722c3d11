"""The lifecycle every metered session shares (server/sessions/lifecycle.py): counted once,
reports on the interval until cancelled, the wallet's failures turned into one vocabulary of
verdicts, settled with its failure logged, never raised."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.billing.meter import KeyRevoked, UsageReport
from server.sessions.lifecycle import MeteredUsage, SessionLifecycle
from server.telemetry.metrics import Metrics
from tests.unit.session_fakes import FakeSessionHost
from tests.unit.virtual_time import run

log = logging.getLogger("streamgate.test.lifecycle")


class ScriptedMeter:
    """A SessionMeter whose wallet answers what the test says."""

    def __init__(self, top_up: bool | Exception = True, settle_fails: bool = False) -> None:
        self.top_up_answer = top_up
        self.settle_fails = settle_fails
        self.reports = 0
        self.settles = 0
        self.accepted = 0

    def accept(self, audio_ms: int) -> None:
        self.accepted += audio_ms

    def drop(self, audio_ms: int) -> None:
        return None

    @property
    def exhausted(self) -> bool:
        return self.top_up_answer is not True

    async def top_up(self) -> bool:
        if isinstance(self.top_up_answer, Exception):
            raise self.top_up_answer
        return self.top_up_answer

    def _report(self) -> UsageReport:
        return UsageReport(self.accepted, self.accepted, 0, 0, None)

    async def report(self) -> UsageReport:
        self.reports += 1
        return self._report()

    async def settle(self) -> UsageReport:
        self.settles += 1
        if self.settle_fails:
            raise ConnectionError("wallet unreachable")
        return self._report()


def usage_of(meter: ScriptedMeter, interval_s: float = 5.0) -> MeteredUsage:
    return MeteredUsage(meter, usage_interval_s=interval_s, log=log, log_extra={"s": "1"})


@pytest.mark.parametrize(("answer", "verdict"), [
    (True, "extended"),
    (False, "refused"),
    (KeyRevoked("revoked"), "revoked"),
    (ConnectionError("redis down"), "refused"),  # money fails closed
])
def test_every_top_up_answer_is_one_verdict(answer: bool | Exception, verdict: str) -> None:
    async def scenario() -> str:
        return await usage_of(ScriptedMeter(top_up=answer)).top_up()

    assert run(scenario()) == verdict


def test_a_wallet_that_fails_at_settle_is_logged_not_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> UsageReport | None:
        return await usage_of(ScriptedMeter(settle_fails=True)).settle()

    with caplog.at_level(logging.ERROR, logger=log.name):
        assert run(scenario()) is None
    assert "meter settle failed" in caplog.text


def test_reports_come_every_interval_with_the_counts_handed_over_first() -> None:
    async def scenario() -> None:
        meter = ScriptedMeter()
        usage = usage_of(meter, interval_s=5.0)
        seen: list[int] = []

        async def before() -> None:
            meter.accept(100)

        task = usage.start_reports(lambda r: seen.append(r.audio_ms), before=before)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(16.0)  # the first after 2.5-5 s, then every 5 s: three or four
        await SessionLifecycle.stop(task)
        assert task.done()
        assert seen == [100 * (i + 1) for i in range(len(seen))]
        assert 3 <= len(seen) <= 4
        assert loop.time() - t0 == 16.0

    run(scenario())


def test_a_session_is_counted_once_and_a_part_of_a_call_not_at_all() -> None:
    async def scenario() -> None:
        host, metrics = FakeSessionHost(), Metrics()
        session = SessionLifecycle(kind="asr", host=host, metrics=metrics, log=log,
                                   log_extra={})
        part = SessionLifecycle(kind="asr", host=host, metrics=metrics, log=log,
                                log_extra={}, counted=False)
        session.opened()
        part.opened()
        assert host.session_count == 1
        assert metrics.sessions_active.labels("asr")._value.get() == 1
        with pytest.raises(RuntimeError):
            session.opened()
        session.closed(1000)
        session.closed(1006)  # a second path to the end changes nothing
        part.closed(1000)
        assert host.session_count == 0
        assert metrics.sessions_active.labels("asr")._value.get() == 0
        assert metrics.sessions_total.labels("asr", "1000")._value.get() == 1
        assert metrics.sessions_total.labels("asr", "1006")._value.get() == 0

    run(scenario())
