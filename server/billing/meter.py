"""The metering seam between sessions and money.

A session opens one `SessionMeter` before `ready`, tells it the audio it accepted and dropped
(integer ms, synchronous: called on the hot path), asks for a `UsageReport` every
`usage_interval_s` and settles it exactly once however the session ends. The billing layer
supplies a wallet-backed implementation; `PricedMeter` prices usage without a wallet.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from server.billing.auth import Principal
from server.protocol.errors import RefusedError


@dataclass(frozen=True, slots=True)
class UsageReport:
    """What a meter counted, in its billing unit (`unit`). The counts keep their ASR names
    (`audio_ms`, `billed_ms`, `dropped_ms`: the wire `usage` of an ASR session); a meter in
    another unit fills them with that unit, so read them through `units` or `characters`."""

    audio_ms: int
    billed_ms: int
    dropped_ms: int
    cost_micros: int
    balance_micros: int | None
    balance_low: bool = False
    # The wallet cannot pay for more: the session must end (error insufficient_balance, 4002).
    exhausted: bool = False
    # A usage limit (audio seconds per minute) was hit: the session must end (4029).
    rate_limited: bool = False
    # The session's API key was revoked: the session must end (error key_revoked, 4001).
    revoked: bool = False
    unit: str = "audio_ms"  # the meter's billing unit: "audio_ms" (ASR) or "characters" (TTS)

    @property
    def units(self) -> int:
        """Usage counted, in `unit`."""
        return self.audio_ms

    @property
    def characters(self) -> int:
        """Usage of a meter counting characters (TTS); ValueError for any other unit."""
        if self.unit != "characters":
            raise ValueError(f"this meter counts {self.unit}, not characters")
        return self.audio_ms


# How a session on a revoked key ends (docs/protocol.md, "Close codes").
KEY_REVOKED_CODE: Final = "key_revoked"
KEY_REVOKED_CLOSE: Final = 4001
KEY_REVOKED_MESSAGE: Final = "the API key of this session was revoked"


class InsufficientBalance(RefusedError):
    """Not even the minimum lease can be granted: HTTP 402 before the session starts."""

    code = "insufficient_balance"
    default_message = "wallet balance too low"


class RateLimited(RefusedError):
    """HTTP 429 before the session starts (e.g. too many concurrent sessions)."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s)
        self.retry_after_s: float = retry_after_s


class BillingUnavailable(RefusedError):
    """Money fails closed: no new session while the wallet cannot be reached (HTTP 503)."""

    code = "billing_unavailable"
    default_message = "billing unavailable"


class KeyRevoked(RefusedError):
    """`top_up` on a meter whose API key was revoked: no new lease; the session ends with
    `key_revoked` (KEY_REVOKED_CLOSE), not `insufficient_balance`."""

    code = KEY_REVOKED_CODE


# What `MeterFactory.open` raises when it refuses a session: `except METER_ERRORS as exc`.
METER_ERRORS: Final = (InsufficientBalance, RateLimited, BillingUnavailable)


class SessionMeter(Protocol):
    def accept(self, audio_ms: int) -> None: ...

    def drop(self, audio_ms: int) -> None: ...

    @property
    def exhausted(self) -> bool:
        """True once accepted usage costs more than the lease holds (checked per batch)."""
        ...

    async def top_up(self) -> bool:
        """`exhausted` turned true: try to extend the lease now; False if nothing more.
        Raises KeyRevoked when the session's key was revoked (`exhausted` turns true then)."""
        ...

    async def report(self) -> UsageReport: ...

    async def settle(self) -> UsageReport: ...


class MeterFactory(Protocol):
    async def open(
        self, *, session_id: str, principal: Principal, model: str, unit: str = "audio_ms"
    ) -> SessionMeter: ...


def cost_micros(units: int, micros_per_block: int, block_units: int = 60000) -> int:
    """Integer money: round the cost of `units` up to the next micro (never give usage away)."""
    return -(-units * micros_per_block // block_units)


class PricedMeter:
    """Counts and prices usage; no wallet behind it (balance_micros is None). Units are the
    model's billing unit (`unit`: audio ms, characters), as the reports say."""

    def __init__(self, micros_per_block: int, block_units: int = 60000,
                 unit: str = "audio_ms") -> None:
        self.unit = unit
        self._price = micros_per_block
        self._block = block_units
        self._audio_ms = 0
        self._dropped_ms = 0
        self._settled: UsageReport | None = None

    def accept(self, audio_ms: int) -> None:
        self._audio_ms += audio_ms

    def drop(self, audio_ms: int) -> None:
        self._dropped_ms += audio_ms

    @property
    def exhausted(self) -> bool:
        return False

    async def top_up(self) -> bool:
        return True

    def _snapshot(self) -> UsageReport:
        return UsageReport(
            audio_ms=self._audio_ms,
            billed_ms=self._audio_ms,
            dropped_ms=self._dropped_ms,
            cost_micros=cost_micros(self._audio_ms, self._price, self._block),
            balance_micros=None,
            unit=self.unit,
        )

    async def report(self) -> UsageReport:
        return self._settled or self._snapshot()

    async def settle(self) -> UsageReport:
        if self._settled is None:
            self._settled = self._snapshot()
        return self._settled


class PricedMeterFactory:
    def __init__(self, prices: dict[tuple[str, str], tuple[int, int]]) -> None:
        """prices: (model, unit) -> (micros_per_block, block_units)."""
        self._prices = prices

    async def open(
        self, *, session_id: str, principal: Principal, model: str, unit: str = "audio_ms"
    ) -> SessionMeter:
        return PricedMeter(*self._prices.get((model, unit), (0, 1)), unit=unit)


def report_delays(interval_s: float) -> Iterator[float]:
    """Sleeps between a session's usage reports: the first after a random 50-100% of the
    interval, then every interval. Sessions opened together (a campaign, a reconnect storm, a
    load test) would otherwise report together for as long as they live: a burst of Redis
    calls every interval that stalls every other session's audio for its duration."""
    yield interval_s * (0.5 + random.random() / 2)
    while True:
        yield interval_s


def cancel_requested() -> bool:
    """True once the running task was asked to stop. A cancellation that lands inside a Redis
    call can come out as the client's own error (redis-py turns some into ConnectionError),
    which the report path handles and goes on: a report loop checks this after every report
    instead of trusting CancelledError to reach it, or its session would never finish."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
