"""The Redis side of billing: wallet cache, leases and usage stream (docs/billing.md, "Redis").

Every state change is one Lua script in `lua/`, so it is atomic and touches the keys of one
tenant only (all named in KEYS, one hash tag: Redis Cluster ready). Every wallet script is
idempotent (the rate limiter's audio.lua is not: server/billing/script_batch.py), because
redis-py retries commands on connection errors and callers retry on timeouts: a script that ran
but whose reply was lost must be safe to run again.

Money is integer micros. Lua computes with doubles, so every amount passed in is checked here to
lie within +-2^50, where doubles are exact (the scripts check again).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from redis.exceptions import NoScriptError, WatchError

from server.billing import keys
from server.billing.redis_client import BillingRedis
from server.billing.script_batch import ScriptBatcher

MAX_MICROS = 2**50  # also the bound for units and seq; matches MAX in lua/_common.lua
_LUA_DIR = Path(__file__).with_name("lua")

ReportStatus = Literal["ok", "unknown", "settled", "duplicate"]
SettleStatus = Literal["ok", "settled", "unknown"]


class WalletMissing(Exception):
    """No wallet cache for the tenant: seed it from Postgres, then retry."""


class LeaseSettled(Exception):
    """RESERVE of a lease id that was already settled (or swept): lease ids are single use."""


@dataclass(frozen=True, slots=True)
class Reservation:
    granted: int
    remaining: int
    spendable: int
    epoch: str


@dataclass(frozen=True, slots=True)
class ReportResult:
    status: ReportStatus
    remaining: int  # granted - charged after this report (0 unless status is ok/duplicate)
    spendable: int  # wallet spendable after this report (0 when the wallet is missing)
    granted: int  # the lease's total grant so far
    topped_up: int = 0  # granted by this report's top-up


@dataclass(frozen=True, slots=True)
class ReplayResult:
    status: ReportStatus
    remaining: int
    spendable: int
    granted: int
    applied: int  # events newly charged by this call


@dataclass(frozen=True, slots=True)
class SettleResult:
    status: SettleStatus
    released: int
    charged: int  # the lease's cumulative cost


@dataclass(frozen=True, slots=True)
class LeaseState:
    lease_id: str
    granted: int
    charged: int
    units: int
    seq: int
    session_id: str
    model: str
    unit: str
    ttl_ms: int
    epoch: str
    expires_at_ms: int

    @property
    def remaining(self) -> int:
        return self.granted - self.charged


@dataclass(frozen=True, slots=True)
class WalletSnapshot:
    spendable: int
    overdraft: int
    epoch: str
    leases: list[LeaseState]


@dataclass(frozen=True, slots=True)
class ReplayEvent:
    seq: int
    units: int  # delta
    cost: int  # delta micros


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _int(v: Any) -> int:
    # Replies are Redis integers or, depending on decode_responses, bytes/str of digits.
    if isinstance(v, int):
        return v
    return int(_str(v))


def _check(name: str, value: int, *, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= MAX_MICROS:
        raise ValueError(f"{name}={value} outside [{lo}, 2**50]")
    return value


def _report_status(v: Any) -> ReportStatus:
    status = _str(v)
    if status not in ("ok", "unknown", "settled", "duplicate"):
        raise ValueError(f"unexpected REPORT status {status!r}")
    return cast(ReportStatus, status)


class LuaScript:
    """One script from `lua/` (with the shared prelude) run by EVALSHA. Its SHA1 is computed
    here, so a server that has the script already (another process loaded it) runs it at once;
    SCRIPT LOAD happens on NOSCRIPT: a restarted (or SCRIPT FLUSHed) Redis, or a cluster master
    that never saw it, and callers must not notice."""

    _prelude: str | None = None

    def __init__(self, name: str) -> None:
        if LuaScript._prelude is None:
            LuaScript._prelude = (_LUA_DIR / "_common.lua").read_text()
        self.name = name
        self.text = LuaScript._prelude + "\n" + (_LUA_DIR / f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.text.encode(), usedforsecurity=False).hexdigest()

    async def load(self, r: BillingRedis) -> str:
        sha: str = await r.script_load(self.text)
        self.sha = sha
        return sha

    async def __call__(self, r: BillingRedis, keys_: Sequence[str], args: Iterable[Any]) -> Any:
        argv = [str(a) for a in args]
        try:
            return await r.evalsha(self.sha, len(keys_), *keys_, *argv)
        except NoScriptError:
            sha = await self.load(r)
            return await r.evalsha(sha, len(keys_), *keys_, *argv)


_NAMES = ("seed", "reserve", "report", "settle", "expired", "sweep", "topup", "refund", "replay")


class WalletCache:
    def __init__(self, redis: BillingRedis, *, batcher: ScriptBatcher | None = None) -> None:
        """`batcher`: live sessions' periodic reports go through it, sent with the other
        sessions' reports of the same moment in one round trip (docs/decisions/15L1)."""
        self._r = redis
        self._s = {name: LuaScript(name) for name in _NAMES}
        self._batch = batcher

    async def load_scripts(self) -> None:
        """Optional warm-up at start-up; calls load lazily anyway."""
        for script in self._s.values():
            await script.load(self._r)

    async def seed(
        self, tenant: str, balance: int, overdraft: int, topup_ids: Iterable[str] = ()
    ) -> bool:
        """Create the wallet from a Postgres snapshot unless it exists; True if created."""
        _check("balance", balance, lo=-MAX_MICROS)
        _check("overdraft", overdraft)
        epoch = uuid.uuid4().hex
        created = await self._s["seed"](
            self._r,
            keys.wallet_ids_keys(tenant, keys.topups_key(tenant)),
            [balance, overdraft, epoch, *topup_ids],
        )
        # Outside the script: sg:tenants has no hash tag (another slot). SADD is idempotent, and
        # it is done even when the wallet existed, in case an earlier SADD was lost.
        await self._r.sadd(keys.TENANTS_SET, tenant)
        return _int(created) == 1

    async def reserve(
        self,
        tenant: str,
        lease_id: str,
        *,
        min_micros: int,
        want_micros: int,
        ttl_ms: int,
        session_id: str,
        model: str,
        unit: str,
    ) -> Reservation | None:
        """Grant a lease; None if even `min_micros` cannot be granted (HTTP 402).

        Raises WalletMissing (seed, then retry) or LeaseSettled."""
        _check("min_micros", min_micros)
        _check("want_micros", want_micros, lo=min_micros)
        _check("ttl_ms", ttl_ms, lo=1)
        res = await self._s["reserve"](
            self._r,
            keys.reserve_keys(tenant, lease_id),
            [lease_id, min_micros, want_micros, ttl_ms, session_id, model, unit],
        )
        status = _str(res[0])
        if status == "nowallet":
            raise WalletMissing(tenant)
        if status == "settled":
            raise LeaseSettled(lease_id)
        if status == "insufficient":
            return None
        return Reservation(_int(res[1]), _int(res[2]), _int(res[3]), _str(res[4]))

    async def report(
        self,
        tenant: str,
        lease_id: str,
        *,
        seq: int,
        cum_units: int,
        cum_cost: int,
        topup_want: int,
        low_water: int,
        ttl_ms: int,
    ) -> ReportResult:
        """Apply cumulative usage `cum_*` as report `seq` (>= 1, increasing per lease)."""
        _check("seq", seq, lo=1)
        _check("cum_units", cum_units)
        _check("cum_cost", cum_cost)
        _check("topup_want", topup_want)
        _check("low_water", low_water)
        _check("ttl_ms", ttl_ms, lo=1)
        keys_ = keys.lease_script_keys(tenant, lease_id)
        args = [lease_id, seq, cum_units, cum_cost, topup_want, low_water, ttl_ms]
        script = self._s["report"]
        if self._batch is not None:
            res = await self._batch(script, keys_, args)
        else:
            res = await script(self._r, keys_, args)
        return ReportResult(_report_status(res[0]), *(_int(v) for v in res[1:5]))

    async def replay(
        self, tenant: str, lease_id: str, events: Iterable[ReplayEvent], *, ttl_ms: int
    ) -> ReplayResult:
        """Charge buffered usage deltas to a lease reserved anew after Redis lost the old one.

        Pass every event of the session from its first seq: the lease's cumulative charge must
        equal the session's, or the next cumulative REPORT would charge the gap twice."""
        _check("ttl_ms", ttl_ms, lo=1)
        args: list[int | str] = [lease_id, ttl_ms]
        for ev in sorted(events, key=lambda e: e.seq):
            args += [_check("seq", ev.seq, lo=1), _check("units", ev.units)]
            args.append(_check("cost", ev.cost))
        res = await self._s["replay"](self._r, keys.lease_script_keys(tenant, lease_id), args)
        return ReplayResult(_report_status(res[0]), *(_int(v) for v in res[1:5]))

    async def settle(
        self, tenant: str, lease_id: str, *, seq: int, cum_units: int, cum_cost: int
    ) -> SettleResult:
        """Final report (applied if `seq` is new) and release of the unused grant."""
        _check("seq", seq)
        _check("cum_units", cum_units)
        _check("cum_cost", cum_cost)
        res = await self._s["settle"](
            self._r, keys.lease_script_keys(tenant, lease_id), [lease_id, seq, cum_units, cum_cost]
        )
        status = _str(res[0])
        if status not in ("ok", "settled", "unknown"):
            raise ValueError(f"unexpected SETTLE status {status!r}")
        return SettleResult(cast(SettleStatus, status), _int(res[1]), _int(res[2]))

    async def sweep(self, tenant: str, limit: int = 100) -> int:
        """Settle up to `limit` expired leases at their last reported usage; returns how many."""
        _check("limit", limit, lo=1)
        ids = [_str(i) for i in await self._s["expired"](
            self._r, [keys.leases_key(tenant)], [limit]
        )]
        if not ids:
            return 0
        return _int(await self._s["sweep"](self._r, keys.sweep_keys(tenant, ids), ids))

    async def topup(self, tenant: str, topup_id: str, amount: int) -> bool:
        """Credit a top-up committed in Postgres; False if already applied or no wallet."""
        _check("amount", amount, lo=1)
        res = await self._s["topup"](
            self._r, keys.wallet_ids_keys(tenant, keys.topups_key(tenant)), [topup_id, amount]
        )
        return _str(res[0]) == "ok"

    async def refund(self, tenant: str, event_id: str, cost: int) -> bool:
        """Give back a replayed event's cost once; False if already refunded or no wallet."""
        _check("cost", cost)
        res = await self._s["refund"](
            self._r, keys.wallet_ids_keys(tenant, keys.refunds_key(tenant)), [event_id, cost]
        )
        return _str(res[0]) == "ok"

    async def spendable(self, tenant: str) -> int | None:
        v = await self._r.hget(keys.wallet_key(tenant), "spendable")
        return None if v is None else _int(v)

    async def leases(self, tenant: str) -> list[LeaseState]:
        snap = await self.snapshot(tenant)
        return [] if snap is None else snap.leases

    async def snapshot(self, tenant: str) -> WalletSnapshot | None:
        """Wallet and open leases read atomically (WATCH/MULTI, retried on conflict), so that
        reconcile can compare spendable + lease remainders with Postgres. None without wallet."""
        wallet, zkey = keys.wallet_key(tenant), keys.leases_key(tenant)
        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(wallet, zkey)
                    ids = [_str(i) for i in await pipe.zrange(zkey, 0, -1)]
                    lkeys = [keys.lease_key(tenant, i) for i in ids]
                    if lkeys:
                        await pipe.watch(*lkeys)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hgetall(wallet)
                    pipe.zrange(zkey, 0, -1, withscores=True)
                    for k in lkeys:
                        pipe.hgetall(k)
                    res = await pipe.execute()
                    break
                except WatchError:
                    continue
        w = {_str(k): v for k, v in res[0].items()}
        if not w:
            return None
        expiries = {_str(m): int(s) for m, s in res[1]}
        leases = []
        for lease_id, raw in zip(ids, res[2:], strict=True):
            h = {_str(k): v for k, v in raw.items()}
            if h:
                leases.append(_lease_state(lease_id, h, expiries.get(lease_id, 0)))
        return WalletSnapshot(_int(w["spendable"]), _int(w["overdraft"]), _str(w["epoch"]), leases)


def _lease_state(lease_id: str, h: dict[str, Any], expires_at_ms: int) -> LeaseState:
    return LeaseState(
        lease_id=lease_id,
        granted=_int(h["granted"]),
        charged=_int(h["charged"]),
        units=_int(h["units"]),
        seq=_int(h["seq"]),
        session_id=_str(h["session_id"]),
        model=_str(h["model"]),
        unit=_str(h["unit"]),
        ttl_ms=_int(h["ttl_ms"]),
        epoch=_str(h["epoch"]),
        expires_at_ms=expires_at_ms,
    )
