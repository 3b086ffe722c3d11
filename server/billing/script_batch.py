"""Many sessions' periodic billing scripts in one Redis round trip (docs/decisions/15L1).

Every live session reports its usage every `usage_interval_s` (a call: two meters, and the
caller-audio one also refreshes its concurrency slot and counts its audio against the tenant's
limit), spread over the interval on purpose (`report_delays`). One EVALSHA each costs the
gateway ~100-190 us of CPU in redis-py (a pooled connection, a command packed, a reply parsed,
a task woken) for ~10 us of work in Redis. `ScriptBatcher` holds the scripts called within
`window_s` of the first one and sends them as one pipeline (no MULTI: each script is atomic on
its own, as it was), so at 1,000 calls a report costs a share of one round trip.

Nothing about a script's outcome changes: each caller gets its own script's reply or error
(a script error, NOSCRIPT handled by loading the script and running it again); a connection
error or timeout fails every call of the round trip with it, and the callers retry as before.
A round trip that fails is the only one its calls fail with: the calls answered before a
NOSCRIPT recovery keep their replies if the recovery fails. On a Redis Cluster no node
answers, the error is redis' ConnectionError, as for one call (redis_client.ClusterClient).

Re-sent scripts: redis-py re-sends a pipeline after a connection error or timeout (the whole
pipeline on one server; on a cluster, the commands not answered yet), so a script whose reply
was lost can run twice, as a single retried EVALSHA can. The money scripts are idempotent
(report.lua: a seq already reported is `duplicate`; the resume save writes the same point
again), and so is a concurrency slot's refresh. `audio.lua` (the rate limiter's audio seconds
per minute, `RateLimiter.add_audio`) is not: it adds its audio on every run, so a re-sent
batch can count the audio of every session in it twice against its tenant's limit, never
money, and at worst refuses audio (4029) early within the minute's window. Batching widens
that from one session to a batch's; left as is (making it idempotent means keying each add by
session and report seq), as the count is a limit's estimate, not a bill.

A caller that stops waiting (cancelled, timed out) leaves the batch unharmed: its script may
still run, as a cancelled single call's may.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from redis.exceptions import NoScriptError

from server.billing.redis_client import BillingRedis

if TYPE_CHECKING:
    from server.billing.wallet_cache import LuaScript

__all__ = ["DEFAULT_WINDOW_S", "MAX_BATCH", "ScriptBatcher"]

# A report waits at most this long for company. Reports come every 5 s per session, so the
# wait is nothing to them; at 1,000 calls (~800 scripts a second) a batch holds ~40.
DEFAULT_WINDOW_S: Final = 0.05
MAX_BATCH: Final = 512  # sent at once when this many are waiting


@dataclass(slots=True)
class _Call:
    script: LuaScript
    keys: Sequence[str]
    args: list[str]
    future: asyncio.Future[Any]


class ScriptBatcher:
    def __init__(self, redis: BillingRedis, *, window_s: float = DEFAULT_WINDOW_S,
                 max_batch: int = MAX_BATCH) -> None:
        if window_s < 0 or max_batch < 1:
            raise ValueError("need window_s >= 0 and max_batch >= 1")
        self._r = redis
        self._window_s = window_s
        self._max = max_batch
        self._waiting: list[_Call] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0  # round trips made (one per batch, plus one per NOSCRIPT recovery)

    async def __call__(self, script: LuaScript, keys_: Sequence[str],
                       args: Iterable[Any]) -> Any:
        """What `script(redis, keys_, args)` returns, sent with the scripts called near it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(_Call(script, keys_, [str(a) for a in args], future))
        if len(self._waiting) >= self._max:
            self._send()
        elif self._timer is None:
            self._timer = loop.call_later(self._window_s, self._send)
        return await future

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._waiting = self._waiting, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Call]) -> None:
        replies = await self._round_trip(batch)
        if replies is None:
            return
        missing = [call for call, reply in zip(batch, replies, strict=True)
                   if isinstance(reply, NoScriptError)]
        # Answer the calls whose scripts ran before any recovery: a failed recovery below must
        # not report a script as failed that did run (add_audio would count its audio twice).
        for call, reply in zip(batch, replies, strict=True):
            if not isinstance(reply, NoScriptError):
                _answer(call, reply)
        if not missing:
            return
        # A restarted or flushed Redis: load each script once, run those again.
        again = await self._round_trip(missing, reload=True)
        if again is not None:
            for call, reply in zip(missing, again, strict=True):
                _answer(call, reply)

    async def _round_trip(self, calls: list[_Call], *, reload: bool = False) -> list[Any] | None:
        """One pipeline's replies (after loading the calls' scripts if `reload`), or None when
        the round trip failed: then every one of `calls` has failed with its error."""
        try:
            if reload:
                for script in {id(call.script): call.script for call in calls}.values():
                    await script.load(self._r)
            return await self._pipeline(calls)
        except asyncio.CancelledError:
            for call in calls:
                call.future.cancel()
            raise
        except Exception as exc:  # the round trip failed: every call of it did
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(exc)
            return None

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        self.batches += 1
        async with self._r.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def aclose(self) -> None:
        """Send what is waiting and wait for the batches in flight (before Redis closes)."""
        self._send()
        if self._running:
            await asyncio.wait(list(self._running))


def _answer(call: _Call, reply: Any) -> None:
    if call.future.done():
        return  # its caller stopped waiting
    if isinstance(reply, Exception):
        call.future.set_exception(reply)
    else:
        call.future.set_result(reply)
