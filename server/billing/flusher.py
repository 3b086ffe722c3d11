"""Usage flusher: Redis usage streams -> one Postgres transaction per batch -> XACK.

Exactly once = at-least-once delivery (consumer group, entries acknowledged only after COMMIT)
+ idempotent apply (usage_events primary key, ON CONFLICT DO NOTHING). A crash between COMMIT
and XACK redelivers entries that then hit the conflict and charge nothing. Every usage row
records the stream entry that inserted it (`usage_events.source`), so a replayed entry is
REFUNDed only when its event came into Postgres from another entry, never from itself. Each
tenant has its own stream (`sg:{t}:usage`, one hash slot per tenant), so a round reads tenant by
tenant; that also keeps one tenant's bad data from blocking everybody else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from redis.exceptions import ReadOnlyError, ResponseError

from server.billing import keys
from server.billing.redis_client import BillingRedis
from server.billing.redis_client import connect as connect_redis
from server.billing.store import (
    UNITS,
    BillingStore,
    RecordedUsage,
    StoredUsage,
    UnknownTenant,
    UsageEvent,
)
from server.telemetry import tracing
from server.telemetry.tracing import TRACING

log = logging.getLogger("streamgate.billing.flusher")

GROUP = keys.FLUSHER_GROUP
FAULT_ENV = "STREAMGATE_FAULT"
FAULT_EXIT_AFTER_COMMIT = "flusher_exit_after_commit"
FAULT_EXIT_CODE = 17
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_BACKOFF_S = 5.0
_ERROR_LOG_EVERY_S = 60.0
_MAX_CLAIM_PAGES = 10  # per tenant per round; the rest is claimed next round
MAX_TRACED_SESSION_IDS = 32  # on a billing.flush span: enough to find a session's flush
_UNTIL_EMPTY_MARGIN_S = 30.0  # --until-empty gives up this long after the claim delay

ReplayConflict = Callable[[str, str, int], Awaitable[None]]
Entry = tuple[str, dict[str, str]]


def as_str(value: Any) -> str:
    # The client may or may not decode responses; accept both.
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> list[Entry]:
    """XREADGROUP / XAUTOCLAIM entries as (id, fields); a deleted entry has empty fields."""
    out: list[Entry] = []
    for entry_id, fields in reply or []:
        out.append((as_str(entry_id), {as_str(k): as_str(v) for k, v in (fields or {}).items()}))
    return out


def entry_source(entry_id: str, fields: dict[str, str]) -> str:
    """The `usage_events.source` of a stream entry: which entry inserted a usage row.

    The wallet epoch is not in an entry. Within one Redis the entry id alone is unique; `ts` and
    `replay` are added for a replay in ANOTHER Redis (after a data loss), whose stream ids start
    afresh from that server's clock: its entry could repeat the original's id only with a clock
    at or behind the lost server's, and then it still differs in `replay` (1 versus 0) and, but
    for the same millisecond, in `ts`. Only two replays of one event in two new Redis servers
    with colliding ids and timestamps would look alike.
    """
    replay = "1" if fields.get("replay", "0") == "1" else "0"
    return f"{entry_id} ts={fields.get('ts', '')} replay={replay}"


def parse_entry(
    tenant_id: str, fields: dict[str, str], *, entry_id: str | None = None
) -> tuple[UsageEvent, bool]:
    """A stream entry (docs/billing.md, Redis) as a UsageEvent and its `replay` flag; with
    `entry_id`, the event's `source` names the entry (entry_source)."""
    try:
        units, cost, ts_ms = int(fields["units"]), int(fields["cost"]), int(fields["ts"])
        event = UsageEvent(
            tenant_id=tenant_id,
            event_id=fields["event_id"],
            session_id=fields["session_id"],
            model=fields["model"],
            unit=fields["unit"],
            units=units,
            cost_micros=cost,
            # timedelta, not fromtimestamp(ms / 1000): no float on the way.
            occurred_at=_EPOCH + timedelta(milliseconds=ts_ms),
            source=None if entry_id is None else entry_source(entry_id, fields),
        )
    except (KeyError, ValueError, OverflowError) as exc:
        raise ValueError(f"malformed usage entry ({type(exc).__name__}: {exc})") from None
    # What Postgres would refuse is refused here, so it cannot block the rest of the batch.
    if not event.event_id or units < 0 or cost < 0 or event.unit not in UNITS:
        raise ValueError("malformed usage entry (empty event_id, negative units or cost,"
                         f" or unknown unit {event.unit!r})")
    return event, fields.get("replay", "0") == "1"


class UsageFlusher:
    def __init__(
        self,
        redis: BillingRedis,
        store: BillingStore,
        *,
        consumer: str,
        batch: int = 500,
        block_ms: int = 200,
        claim_idle_ms: int = 30000,
        on_replay_conflict: ReplayConflict | None = None,
        tenants_key: str = keys.TENANTS_SET,
    ) -> None:
        self._redis = redis
        self._store = store
        self._consumer = consumer
        self._batch = batch
        self._block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self._on_replay_conflict = on_replay_conflict
        # Another set only to confine a flusher to some tenants (tests on a shared Redis).
        self._tenants_key = tenants_key
        self._groups: set[str] = set()  # tenants whose stream group this process ensured
        # (tenant, entry id): stream ids are unique per stream only.
        self._malformed: set[tuple[str, str]] = set()  # already logged as malformed
        self._error_logged: dict[str, float] = {}  # tenant -> monotonic time of last log
        self._fault_exit = os.environ.get(FAULT_ENV) == FAULT_EXIT_AFTER_COMMIT

    async def flush_once(self) -> int:
        """One round over every cached tenant; returns the number of entries acknowledged.

        Errors local to one tenant (unknown in Postgres, constraint violations, a wrong key
        type, an id unfit for a key name) are logged and leave that tenant's entries pending;
        connection errors propagate to the caller, every unacknowledged entry still pending.
        """
        members: Any = await self._redis.smembers(self._tenants_key)
        processed = 0
        for tenant_id in sorted(as_str(m) for m in members):
            try:
                processed += await self._flush_tenant(tenant_id)
            except (UnknownTenant, asyncpg.IntegrityConstraintViolationError,
                    asyncpg.DataError, ResponseError, ValueError) as exc:
                if isinstance(exc, ReadOnlyError):
                    raise  # a failover in progress concerns every tenant: back off
                self._groups.discard(tenant_id)  # ensure the group again next round
                # At most one log line per tenant per minute: the failure repeats every round.
                now = time.monotonic()
                if now - self._error_logged.get(tenant_id, -_ERROR_LOG_EVERY_S) >= \
                        _ERROR_LOG_EVERY_S:
                    self._error_logged[tenant_id] = now
                    log.exception("usage flush failed for tenant %s; entries stay pending",
                                  tenant_id, extra={"tenant_id": tenant_id})
        return processed

    async def run(self, stop: asyncio.Event) -> None:
        """Flush until `stop` is set; back off on errors, sleep `block_ms` when idle."""
        backoff = 0.0
        while not stop.is_set():
            try:
                processed = await self.flush_once()
            except Exception:
                # Postgres or Redis unreachable: nothing was acknowledged that is not
                # committed, so waiting and retrying loses nothing.
                backoff = min(max(backoff * 2, 0.1), _MAX_BACKOFF_S)
                log.exception("usage flush failed; retrying in %.1f s", backoff)
                await _wait(stop, backoff)
                continue
            backoff = 0.0
            if processed == 0:
                await _wait(stop, self._block_ms / 1000)

    async def unflushed(self) -> int:
        """Entries left in the usage streams of every cached tenant (acknowledged entries are
        deleted, so this is what Postgres has not got yet, pending or not)."""
        members: Any = await self._redis.smembers(self._tenants_key)
        total = 0
        for tenant_id in (as_str(m) for m in members):
            total += int(await self._redis.xlen(keys.usage_stream(tenant_id)))
        return total

    async def run_until_empty(self, stop: asyncio.Event, give_up_s: float) -> int:
        """Flush until every usage stream is empty (0 returned) or `give_up_s` passed or `stop`
        is set (the entries left returned). For moving to another Redis (decision 13B1): the
        old Redis's streams must reach Postgres first. Entries still pending with another
        consumer are claimed once idle for `claim_idle_ms`, so give it longer than that."""
        deadline = time.monotonic() + give_up_s
        while True:
            try:
                if await self.flush_once():
                    continue
                left = await self.unflushed()
            except Exception:
                if stop.is_set() or time.monotonic() > deadline:
                    raise
                log.exception("usage flush failed; retrying in %.1f s", _MAX_BACKOFF_S)
                await _wait(stop, _MAX_BACKOFF_S)
                continue
            if left == 0 or stop.is_set() or time.monotonic() > deadline:
                return left
            await _wait(stop, self._block_ms / 1000)

    async def _flush_tenant(self, tenant_id: str) -> int:
        try:
            return await self._flush_stream(tenant_id)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        # The stream and its group vanished (Redis lost its data): start afresh at once.
        self._groups.discard(tenant_id)
        return await self._flush_stream(tenant_id)

    async def _flush_stream(self, tenant_id: str) -> int:
        key = keys.usage_stream(tenant_id)
        await self._ensure_group(tenant_id, key)
        await self._claim_idle(key)
        processed = 0
        # Our own pending entries first (claimed from a dead consumer, or left by a failed
        # transaction), walking forward so malformed entries cannot starve the rest.
        cursor = "0"
        while True:
            entries = await self._read(key, cursor)
            if not entries:
                break
            processed += await self._process(tenant_id, key, entries)
            cursor = entries[-1][0]
            if len(entries) < self._batch:
                break
        # Then one batch of new entries per tenant per round, so one busy tenant cannot
        # delay the others; run() loops again at once while there is work.
        entries = await self._read(key, ">")
        if entries:
            processed += await self._process(tenant_id, key, entries)
        return processed

    async def _ensure_group(self, tenant_id: str, key: str) -> None:
        if tenant_id in self._groups:
            return
        try:
            # From id 0: entries written before the group existed are usage too.
            await self._redis.xgroup_create(key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(tenant_id)

    async def _claim_idle(self, key: str) -> None:
        start = "0-0"
        for _ in range(_MAX_CLAIM_PAGES):
            reply: Any = await self._redis.xautoclaim(
                key, GROUP, self._consumer, self.claim_idle_ms, start_id=start,
                count=self._batch, justid=False,
            )
            # [next cursor, claimed entries, deleted ids]; the claimed entries are now in
            # our pending list and are read by the pending pass that follows.
            start = as_str(reply[0])
            if start == "0-0":
                return

    async def _read(self, key: str, start: str) -> list[Entry]:
        reply: Any = await self._redis.xreadgroup(
            GROUP, self._consumer, {key: start}, count=self._batch
        )
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3
            return _entries(next(iter(reply.values()))[0])
        return _entries(reply[0][1])

    async def _process(self, tenant_id: str, key: str, entries: list[Entry]) -> int:
        if not TRACING.on:
            return await self._process_entries(tenant_id, key, entries)
        # A span per batch of entries (not per round: an idle flusher polls every block_ms).
        # Its own trace: usage entries carry no trace context; the session ids find it.
        sessions = sorted({fields.get("session_id", "") for _, fields in entries if fields})
        with tracing.child("billing.flush", attributes={
                "streamgate.tenant_id": tenant_id, "streamgate.entries": len(entries),
                "streamgate.session_ids": sessions[:MAX_TRACED_SESSION_IDS]}) as span:
            acked = await self._process_entries(tenant_id, key, entries)
            span.set_attribute("streamgate.acknowledged", acked)
            return acked

    async def _process_entries(self, tenant_id: str, key: str, entries: list[Entry]) -> int:
        events: list[_Parsed] = []
        acks: list[str] = []
        for entry_id, fields in entries:
            if not fields:
                # Deleted while pending: nothing left to record, only the PEL slot to free.
                log.warning("usage entry %s of tenant %s vanished before flush", entry_id,
                            tenant_id, extra={"tenant_id": tenant_id})
                acks.append(entry_id)
                continue
            try:
                event, replay = parse_entry(tenant_id, fields, entry_id=entry_id)
            except ValueError as exc:
                # Left pending (not acknowledged): money we cannot read is not dropped.
                if (tenant_id, entry_id) not in self._malformed:
                    self._malformed.add((tenant_id, entry_id))
                    log.error("usage entry %s of tenant %s left pending: %s", entry_id,
                              tenant_id, exc, extra={"tenant_id": tenant_id})
                continue
            events.append(_Parsed(entry_id, event, replay))
            acks.append(entry_id)
        if events:
            recorded = await self._store.record_usage_detailed([p.event for p in events])
            if recorded.inserted and self._fault_exit:
                os._exit(FAULT_EXIT_CODE)  # crash test: committed, not acknowledged
            await self._refund_replays(tenant_id, events, recorded)
        if acks:
            # Acknowledged entries are in Postgres. Deleting them (atomically with the ack)
            # bounds the stream, and memory under noeviction, to what is not flushed yet;
            # reconcile relies on it: every entry in a stream is unacknowledged.
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(key, GROUP, *acks)
                pipe.xdel(key, *acks)
                await pipe.execute()
        return len(acks)

    async def _refund_replays(
        self, tenant_id: str, events: list[_Parsed], recorded: RecordedUsage
    ) -> None:
        """REFUND replayed events Postgres already had, BEFORE their entries are acked.

        A replayed entry needs a refund unless it is the entry that put its event into
        Postgres: the cache charged the event once more only if another entry (the original,
        before Redis lost its data) had brought it there. Whether this entry did is read from
        Postgres (the row's `source`), not from memory, so it survives a crash between COMMIT
        and XACK, a claim by another consumer and a batch retried after a failure: such a
        redelivery conflicts with its own row and refunds nothing. A refund failure leaves the
        batch pending; the retry refunds the same events (REFUND is idempotent per event id).
        """
        refunds: dict[str, int] = {}
        for p in events:
            if not p.replay or p.event.event_id in refunds:
                continue
            row = recorded.rows[(tenant_id, p.event.event_id)]
            if not _inserted_by(row, p.event):
                refunds[p.event.event_id] = p.event.cost_micros
        for event_id, cost in refunds.items():
            if self._on_replay_conflict is None:
                log.warning("replayed event %s of tenant %s conflicted; no refund hook",
                            event_id, tenant_id, extra={"tenant_id": tenant_id})
                continue
            await self._on_replay_conflict(tenant_id, event_id, cost)


def _inserted_by(row: StoredUsage, event: UsageEvent) -> bool:
    """Did the stream entry of `event` insert `row` (in this call or an earlier one)?"""
    if row.source is not None:
        return row.source == event.source
    # A row older than migration 002 (or written without a source): its occurred_at is the `ts`
    # of the entry that inserted it, and a replay's ts (Redis TIME at replay) follows the
    # original's. Equal ts: most likely this very entry, committed before the upgrade.
    return row.occurred_at == event.occurred_at


@dataclass(frozen=True, slots=True)
class _Parsed:
    entry_id: str
    event: UsageEvent
    replay: bool


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def flusher_main(
    redis_url: str,
    database_url: str,
    *,
    consumer: str | None = None,
    make_refund: Callable[[BillingRedis], ReplayConflict] | None = None,
    tenants_key: str = keys.TENANTS_SET,
    until_empty: bool = False,
    claim_idle_ms: int = 30000,
) -> int:
    """`streamgate flusher`: flush until SIGTERM/SIGINT. `make_refund` builds the REFUND hook.

    `until_empty` (`--until-empty`): flush until every usage stream is empty, then exit 0; exit
    1 if entries are left after the claim delay plus a margin (malformed entries, or Postgres
    refusing a tenant's rows: the log says which)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = connect_redis(redis_url)
    store: BillingStore | None = None
    try:
        backoff = 0.1
        while store is None and not stop.is_set():
            try:
                store = await BillingStore.connect(database_url, min_size=1, max_size=2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.exception("cannot connect to Postgres; retrying in %.1f s", backoff)
                await _wait(stop, backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        if store is not None:
            flusher = UsageFlusher(
                client, store, consumer=consumer or default_consumer(),
                on_replay_conflict=make_refund(client) if make_refund else None,
                tenants_key=tenants_key, claim_idle_ms=claim_idle_ms,
            )
            if not until_empty:
                await flusher.run(stop)
            else:
                left = await flusher.run_until_empty(stop, _UNTIL_EMPTY_MARGIN_S
                                                     + flusher.claim_idle_ms / 1000)
                print(f"usage streams: {left} entries not flushed" if left
                      else "usage streams: empty")
                return 1 if left else 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if store is not None:
            await store.close()
        await client.aclose()
    return 0
