"""A pure-Python model of one tenant's Redis wallet cache (docs/billing.md, "Redis" scripts).

The state-machine test drives it and the real scripts with the same operations and compares
every answer and the resulting state. Time is not modelled: expiry is an explicit `expire`.
Results use the same tuples/values as the WalletCache dataclasses so they compare directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelLease:
    granted: int
    session_id: str
    charged: int = 0
    units: int = 0
    seq: int = 0

    @property
    def remaining(self) -> int:
        return self.granted - self.charged


@dataclass
class ModelEvent:
    event_id: str
    units: int
    cost: int
    replay: bool


@dataclass
class WalletModel:
    exists: bool = False
    spendable: int = 0
    overdraft: int = 0
    leases: dict[str, ModelLease] = field(default_factory=dict)
    tombstones: dict[str, tuple[int, int]] = field(default_factory=dict)  # released, charged
    stream: list[ModelEvent] = field(default_factory=list)
    topup_ids: set[str] = field(default_factory=set)
    refund_ids: set[str] = field(default_factory=set)
    # money that entered the cache, for the invariant
    seeded: int = 0
    topped_up: int = 0
    refunded: int = 0

    def seed(self, balance: int, overdraft: int, topup_ids: list[str]) -> bool:
        if self.exists:
            return False
        self.exists, self.spendable, self.overdraft = True, balance, overdraft
        self.seeded = balance
        self.topup_ids |= set(topup_ids)
        return True

    def reserve(self, lease_id: str, min_: int, want: int) -> tuple[str, int, int, int]:
        """(status, granted, remaining, spendable); status ok/insufficient/settled/nowallet."""
        if lease_id in self.tombstones:
            return ("settled", 0, 0, 0)
        if not self.exists:
            return ("nowallet", 0, 0, 0)
        lease = self.leases.get(lease_id)
        if lease is not None:
            return ("ok", lease.granted, lease.remaining, self.spendable)
        g = min(want, self.spendable + self.overdraft)
        if g < min_:
            return ("insufficient", 0, 0, self.spendable)
        self.spendable -= g
        self.leases[lease_id] = ModelLease(granted=g, session_id=lease_id)
        return ("ok", g, g, self.spendable)

    def _charge(self, lease: ModelLease, seq: int, units: int, cost: int, replay: bool) -> None:
        lease.charged += cost
        lease.units += units
        lease.seq = seq
        if lease.charged > lease.granted:
            self.spendable -= lease.charged - lease.granted
            lease.granted = lease.charged
        self.stream.append(ModelEvent(f"{lease.session_id}:{seq}", units, cost, replay))

    def _closed(self, lease_id: str) -> tuple[str, int, int, int, int] | None:
        if lease_id in self.tombstones:
            return ("settled", 0, self.spendable, 0, 0)
        if lease_id not in self.leases:
            return ("unknown", 0, self.spendable, 0, 0)
        return None

    def report(
        self, lease_id: str, seq: int, cum_units: int, cum_cost: int, topup_want: int,
        low_water: int,
    ) -> tuple[str, int, int, int, int]:
        """(status, remaining, spendable, granted, topped_up)."""
        closed = self._closed(lease_id)
        if closed is not None:
            return closed
        lease = self.leases[lease_id]
        if seq <= lease.seq:
            return ("duplicate", lease.remaining, self.spendable, lease.granted, 0)
        self._charge(lease, seq, cum_units - lease.units, cum_cost - lease.charged, False)
        topped = 0
        if lease.remaining < low_water:
            topped = max(0, min(topup_want, self.spendable + self.overdraft))
            self.spendable -= topped
            lease.granted += topped
        return ("ok", lease.remaining, self.spendable, lease.granted, topped)

    def replay(
        self, lease_id: str, events: list[tuple[int, int, int]]
    ) -> tuple[str, int, int, int, int]:
        """(status, remaining, spendable, granted, applied); events are (seq, units, cost)."""
        closed = self._closed(lease_id)
        if closed is not None:
            return closed
        lease = self.leases[lease_id]
        applied = 0
        for seq, units, cost in sorted(events):
            if seq > lease.seq:
                self._charge(lease, seq, units, cost, True)
                applied += 1
        status = "ok" if applied else "duplicate"
        return (status, lease.remaining, self.spendable, lease.granted, applied)

    def settle(
        self, lease_id: str, seq: int, cum_units: int, cum_cost: int
    ) -> tuple[str, int, int]:
        """(status, released, charged)."""
        if lease_id in self.tombstones:
            return ("settled", *self.tombstones[lease_id])
        lease = self.leases.get(lease_id)
        if lease is None:
            return ("unknown", 0, 0)
        if seq > lease.seq:
            self._charge(lease, seq, cum_units - lease.units, cum_cost - lease.charged, False)
        return ("ok", *self._close(lease_id))

    def _close(self, lease_id: str) -> tuple[int, int]:
        lease = self.leases.pop(lease_id)
        self.spendable += lease.remaining
        self.tombstones[lease_id] = (lease.remaining, lease.charged)
        return self.tombstones[lease_id]

    def sweep(self, expired: list[str]) -> int:
        swept = [lease_id for lease_id in expired if lease_id in self.leases]
        for lease_id in swept:
            self._close(lease_id)
        return len(swept)

    def topup(self, topup_id: str, amount: int) -> bool:
        if not self.exists or topup_id in self.topup_ids:
            return False
        self.topup_ids.add(topup_id)
        self.spendable += amount
        self.topped_up += amount
        return True

    def refund(self, event_id: str, cost: int) -> bool:
        if not self.exists or event_id in self.refund_ids:
            return False
        self.refund_ids.add(event_id)
        self.spendable += cost
        self.refunded += cost
        return True

    def invariant_holds(self) -> bool:
        """Cache invariant: all money that entered the cache is spendable, held by a lease or
        recorded as usage in the stream (refunds compensate replayed duplicates)."""
        held = sum(lease.remaining for lease in self.leases.values())
        used = sum(e.cost for e in self.stream)
        return self.spendable + held + used == self.seeded + self.topped_up + self.refunded
