"""The life every metered session shares, written once: opened (counted against the node, in
the metrics, one log line) -> a usage report every interval -> lease top-ups when the lease is
used up -> settled exactly once -> closed (counted, in the metrics, one log line).

Two halves, because a phone call has one life and two meters (caller audio, agent speech):
- `SessionLifecycle`: counted against the node and in the metrics, one log line at each end.
  A part of a composite session (the caller-audio ASR runner inside a call) is created with
  `counted=False`: the call is counted once, as a call.
- `MeteredUsage`: one meter's reports, top-ups and settlement, with the wallet's failures
  handled the same way everywhere.

ASR, TTS, a phone call and the HTTP speech routes plug their policy in: what a report means for
the session (`on_report`), what a refused top-up does (`LeaseVerdict`), which fields their log
lines carry. None of them reimplements the loop, the error handling around the wallet or the
accounting, so they cannot drift apart again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from server.billing.meter import (
    KeyRevoked,
    SessionMeter,
    UsageReport,
    cancel_requested,
    report_delays,
)
from server.sessions.host import SessionHost
from server.telemetry.metrics import Metrics

# What a lease top-up came to: more lease, the wallet cannot pay (or could not be reached:
# money fails closed), or the session's key was revoked meanwhile.
LeaseVerdict = Literal["extended", "refused", "revoked"]


class SessionLifecycle:
    __slots__ = ("_closed", "_counted", "_extra", "_host", "_kind", "_log", "_metrics",
                 "_opened")

    def __init__(self, *, kind: str, host: SessionHost, metrics: Metrics, log: logging.Logger,
                 log_extra: Mapping[str, Any], counted: bool = True) -> None:
        self._kind = kind
        self._host = host
        self._metrics = metrics
        self._log = log
        self._extra = log_extra  # the session's own dict: fields it learns later show up too
        self._counted = counted
        self._opened = False
        self._closed = False

    def opened(self, message: str | None = "session started", **fields: Any) -> None:
        """Once, when the session starts: from here it counts against the node's limit. No
        line when `message` is None (a call says more once it goes live)."""
        if self._opened:
            raise RuntimeError("session lifecycle opened twice")
        self._opened = True
        if self._counted:
            self._metrics.sessions_active.labels(self._kind).inc()
            self._host.session_opened()
        if message is not None:
            self._log.info(message, extra={**self._extra, **fields})

    def closed(self, code: int, message: str = "session ended", **fields: Any) -> None:
        """Once, when everything of the session is settled and closed; later calls do
        nothing (a session may end along several paths)."""
        if self._closed:
            return
        self._closed = True
        if self._counted and self._opened:
            self._metrics.sessions_active.labels(self._kind).dec()
            self._metrics.sessions_total.labels(self._kind, str(code)).inc()
            self._host.session_closed()
        self._log.info(message, extra={**self._extra, "close_code": code, **fields})

    @staticmethod
    async def stop(*tasks: asyncio.Task[Any] | None) -> None:
        """Cancel a session's tasks and wait for each to finish (none is left to leak)."""
        running = [t for t in tasks if t is not None]
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class MeteredUsage:
    __slots__ = ("_extra", "_interval_s", "_log", "meter")

    def __init__(self, meter: SessionMeter, *, usage_interval_s: float, log: logging.Logger,
                 log_extra: Mapping[str, Any]) -> None:
        self.meter = meter
        self._interval_s = usage_interval_s
        self._log = log
        self._extra = log_extra

    @property
    def exhausted(self) -> bool:
        """What was counted costs more than the lease holds: time for `top_up`."""
        return self.meter.exhausted

    def start_reports(self, on_report: Callable[[UsageReport], None],
                      before: Callable[[], Awaitable[None]] | None = None) -> asyncio.Task[None]:
        """A task reporting usage every `usage_interval_s` (the first after a random part of
        it, so sessions opened together do not report together): `before` hands the meter
        what was counted since, `on_report` applies the wallet's verdict. Cancel it
        (`SessionLifecycle.stop`) before settling: the session awaits it, so it is not the
        host's to track."""
        return asyncio.get_running_loop().create_task(self._reports(on_report, before))

    async def _reports(self, on_report: Callable[[UsageReport], None],
                       before: Callable[[], Awaitable[None]] | None) -> None:
        for delay in report_delays(self._interval_s):
            await asyncio.sleep(delay)
            if before is not None:
                await before()
            report = await self.meter.report()
            if cancel_requested():
                return  # see cancel_requested: a cancel may come out of redis as its own error
            on_report(report)

    async def top_up(self) -> LeaseVerdict:
        """The lease is used up: ask the wallet for more."""
        try:
            extended = await self.meter.top_up()
        except KeyRevoked:
            return "revoked"
        except Exception:
            self._log.exception("lease top-up failed", extra=dict(self._extra))
            return "refused"
        return "extended" if extended else "refused"

    async def settle(self) -> UsageReport | None:
        """Settle the meter (idempotent in every meter); None if the wallet failed, which is
        logged: the usage is still in the wallet's stream for the flusher."""
        try:
            return await self.meter.settle()
        except Exception:
            self._log.exception("meter settle failed", extra=dict(self._extra))
            return None
