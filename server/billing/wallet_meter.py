"""A session's meter backed by a wallet lease (docs/billing.md, "Sessions").

Reports carry cumulative usage and a strictly increasing seq. A report whose outcome is unknown
(timeout, Redis down) is retried with the SAME seq and usage until Redis answers, so the list of
acknowledged reports is exactly what Redis applied: that list is what gets replayed if Redis
loses the lease. Meanwhile the session streams on the lease it holds, never past its grant.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from server.billing.meter import KeyRevoked, UsageReport
from server.billing.store import Price
from server.billing.wallet_cache import ReplayEvent, WalletCache, WalletMissing

log = logging.getLogger("streamgate.billing")

# (tenant_id, session_id, audio_ms just used) -> still within the tenant's usage limits?
AudioLimit = Callable[[str, str, int], Awaitable[bool]]
# Seeds a tenant's wallet cache from Postgres (Redis lost it or never had it).
WalletSeeder = Callable[[str], Awaitable[None]]

SETTLE_ATTEMPTS = 20


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    lease_units: int  # units reserved per lease and per top-up
    min_units: int  # a session needs at least this much to start
    low_units: int  # warn when less than this much is left
    ttl_ms: int  # a lease not reported for this long is settled by the sweeper


@dataclass(slots=True)
class _Ack:
    seq: int
    cum_units: int
    cum_cost: int


class WalletMeter:
    def __init__(
        self,
        *,
        cache: WalletCache,
        tenant_id: str,
        session_id: str,
        model: str,
        price: Price,
        policy: LeasePolicy,
        seed: WalletSeeder,
        on_audio: AudioLimit | None = None,
    ) -> None:
        self._seed = seed
        self._cache = cache
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.model = model
        self._price = price
        self._policy = policy
        self._on_audio = on_audio
        self.lease_id = session_id
        self._lease_no = 0
        # Usage of earlier leases of this session (a lease swept while Redis was unreachable).
        self._base_units = 0
        self._base_cost = 0
        self.units = 0
        self._billed_high = 0
        self.dropped = 0
        # Accepted units at which the lease is used up (`exhausted`), kept with the grant: the
        # check runs per ingest batch, 50 times a second per call. -1: a price it cannot be
        # kept for (not a positive price per positive block), checked the long way.
        self._exhausted_at = -1
        self._granted = 0
        self.granted = 0  # this lease's grant as last known
        self._spendable = 0
        self._seq = 0
        self._acks: list[_Ack] = []  # this lease's acknowledged reports, for replay
        self._pending: _Ack | None = None
        self._settled: UsageReport | None = None
        self._reported_units = 0
        self._rate_limited = False
        self.revoked = False  # the session's API key was revoked: no new lease, end it
        self._lock = asyncio.Lock()

    # --- hot path -------------------------------------------------------------------------------

    def accept(self, audio_ms: int) -> None:
        self.units += audio_ms

    def drop(self, audio_ms: int) -> None:
        self.dropped += audio_ms

    @property
    def granted(self) -> int:
        return self._granted

    @granted.setter
    def granted(self, value: int) -> None:
        self._granted = value
        self._exhausted_at = _units_to_reach(self._price, value + self._base_cost)

    @property
    def exhausted(self) -> bool:
        """Accepted usage reached what the lease holds: the session must top up (an immediate
        report) or stop. Checked per ingest batch, whatever Redis is doing; true at once when
        the key is revoked, so a streaming session learns of it at its next batch."""
        at = self._exhausted_at
        if at >= 0:
            return self.revoked or self.units >= at
        return self.revoked or self._price.cost(self.units) - self._base_cost >= self._granted

    def revoke(self) -> None:
        """The key was revoked: the session ends at its next batch or report (what it used up
        to then is charged as usual at settle; the lease is never extended again)."""
        self.revoked = True

    @property
    def billable(self) -> int:
        """Units charged: never more than the leases granted cover, so a wallet run dry is
        never charged past its grant. What a session accepted beyond that (at most the batch in
        which its lease ran out) is given away rather than charged as debt."""
        p = self._price
        if p.micros_per_block == 0:
            return self.units
        covered = (self.granted + self._base_cost) * p.block_units // p.micros_per_block
        # Never below what was already reported: cumulative reports only move forward.
        return min(self.units, max(covered, self._base_units, self._billed_high))

    # --- lease lifecycle ------------------------------------------------------------------------

    def _cost(self, units: int) -> int:
        return self._price.cost(units)

    async def open(self) -> bool:
        """Reserve the first lease; False if the wallet cannot grant the minimum."""
        return await self._reserve()

    async def _reserve(self) -> bool:
        want = self._cost(self._policy.lease_units)
        minimum = self._cost(self._policy.min_units)
        for attempt in (1, 2):
            try:
                res = await self._cache.reserve(
                    self.tenant_id, self.lease_id, min_micros=minimum, want_micros=want,
                    ttl_ms=self._policy.ttl_ms, session_id=self.session_id, model=self.model,
                    unit=self._price.unit,
                )
                break
            except WalletMissing:
                if attempt == 2:
                    raise
                await self._seed(self.tenant_id)
        if res is None:
            return False
        self.granted = res.granted
        self._spendable = res.spendable
        return True

    async def top_up(self) -> bool:
        """The lease ran out between reports (a client faster than real time): report now,
        which tops the lease up if the wallet can; False if it could not."""
        if self.revoked:
            raise KeyRevoked("API key revoked")
        await self.report()
        if self.revoked:
            raise KeyRevoked("API key revoked")
        return not self.exhausted

    async def report(self) -> UsageReport:
        async with self._lock:
            if self._settled is not None:
                return self._settled
            try:
                await self._report_once()
            except RedisError as exc:
                # Live sessions go on on the lease they hold; the report is retried next time.
                log.warning("usage report deferred: %s", exc, extra=self._log())
            return await self._snapshot()

    async def _report_once(self) -> None:
        if self._pending is None:
            self._seq += 1
            units = self._billed_high = self.billable
            self._pending = _Ack(self._seq, units - self._base_units,
                                 self._cost(units) - self._base_cost)
        p = self._pending
        # A revoked key's lease is never renewed: its session is ending.
        topup_want = 0 if self.revoked else self._cost(self._policy.lease_units)
        res = await self._cache.report(
            self.tenant_id, self.lease_id, seq=p.seq, cum_units=p.cum_units,
            cum_cost=p.cum_cost, topup_want=topup_want,
            low_water=self._cost(self._policy.low_units), ttl_ms=self._policy.ttl_ms,
        )
        if res.status == "unknown":
            await self._recover_lost_lease()
            return
        if res.status == "settled":
            await self._continue_on_new_lease()
            return
        self._acks.append(p)
        self._pending = None
        self.granted = res.granted
        self._spendable = res.spendable
        if self._on_audio is not None:
            delta = p.cum_units + self._base_units - self._reported_units
            self._reported_units += delta
            self._rate_limited = not await self._on_audio(self.tenant_id, self.session_id, delta)

    async def _recover_lost_lease(self) -> None:
        """Redis lost the lease (restart): reserve it anew and replay what Redis had applied."""
        log.warning("lease lost by Redis; replaying reports", extra=self._log())
        if not await self._reserve():
            # Nothing left to grant: charge what was used, then the session ends as exhausted.
            self.granted = 0
        events: list[ReplayEvent] = []
        prev_units = prev_cost = 0
        for ack in [*self._acks, *([self._pending] if self._pending else [])]:
            events.append(
                ReplayEvent(ack.seq, ack.cum_units - prev_units, ack.cum_cost - prev_cost)
            )
            prev_units, prev_cost = ack.cum_units, ack.cum_cost
        res = await self._cache.replay(self.tenant_id, self.lease_id, events,
                                       ttl_ms=self._policy.ttl_ms)
        if self._pending is not None:
            self._acks.append(self._pending)
            self._pending = None
        self.granted = res.granted
        self._spendable = res.spendable

    async def _continue_on_new_lease(self) -> None:
        """The sweeper settled our lease (we were cut off for longer than its ttl) at the last
        acknowledged usage: open a new lease for the usage since then."""
        last = self._acks[-1] if self._acks else _Ack(0, 0, 0)
        self._base_units += last.cum_units
        self._base_cost += last.cum_cost  # `exhausted`'s bound follows with the grant below
        self._lease_no += 1
        self.lease_id = f"{self.session_id}.{self._lease_no}"
        self._acks, self._pending = [], None
        self.granted = 0
        log.warning("lease swept while unreachable; continuing on %s", self.lease_id,
                    extra=self._log())
        if await self._reserve():
            await self._report_once()

    async def settle(self) -> UsageReport:
        """Final report and release of the unused grant; retried, since money must not leak."""
        async with self._lock:
            if self._settled is not None:
                return self._settled
            delay = 0.05
            for attempt in range(SETTLE_ATTEMPTS):
                try:
                    await self._settle_once()
                    break
                except (RedisError, WalletMissing) as exc:
                    if attempt == SETTLE_ATTEMPTS - 1:
                        # The sweeper settles the lease at its last acknowledged usage.
                        log.error("settle failed, left to the sweeper: %s", exc,
                                  extra=self._log())
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            self._settled = await self._snapshot(final=True)
            return self._settled

    async def _settle_once(self) -> None:
        if self._pending is not None:
            # An unanswered report may have been applied: resolve it first, same seq.
            await self._report_once()
        self._seq += 1
        units = self._billed_high = self.billable
        cum_units = units - self._base_units
        cum_cost = self._cost(units) - self._base_cost
        res = await self._cache.settle(self.tenant_id, self.lease_id, seq=self._seq,
                                       cum_units=cum_units, cum_cost=cum_cost)
        if res.status == "unknown":
            # Redis lost the lease: put it back with its history, then settle again.
            self._pending = _Ack(self._seq, cum_units, cum_cost)
            await self._recover_lost_lease()
            self._seq += 1
            await self._cache.settle(self.tenant_id, self.lease_id, seq=self._seq,
                                     cum_units=cum_units, cum_cost=cum_cost)

    async def _snapshot(self, final: bool = False) -> UsageReport:
        billed = self.billable
        cost = self._cost(billed)
        remaining = max(0, self.granted - (cost - self._base_cost))
        balance = self._spendable + remaining
        low_water = self._cost(self._policy.low_units)
        return UsageReport(
            audio_ms=self.units,
            billed_ms=billed,
            dropped_ms=self.dropped,
            cost_micros=cost,
            balance_micros=balance,
            balance_low=not final and balance < low_water,
            exhausted=not final and remaining <= 0 and self._spendable <= 0 and self.units > 0,
            rate_limited=not final and self._rate_limited,
            revoked=not final and self.revoked,
            unit=self._price.unit,
        )

    def _log(self) -> dict[str, str]:
        return {"session_id": self.session_id, "tenant_id": self.tenant_id}


_NEVER = 2**63  # more units than a session can accept


def _units_to_reach(price: Price, cost: int) -> int:
    """The fewest cumulative units whose `price.cost` is at least `cost` (the lease's grant plus
    what earlier leases charged), or -1 when the price is not positive per positive block."""
    m, b = price.micros_per_block, price.block_units
    if b <= 0 or m < 0:
        return -1
    if cost <= 0:
        return 0
    if m == 0:
        return _NEVER  # free: costs nothing however much is used
    # ceil(u * m / b) >= cost  <=>  u * m > (cost - 1) * b
    return (cost - 1) * b // m + 1
