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
error or timeout fails every call of the batch with it, and the callers retry as before. Every
billing script is idempotent (wallet_cache.py), so redis-py re-sending the whole pipeline
after a connection error is as safe as re-sending one script. A caller that stops waiting
(cancelled, timed out) leaves the batch unharmed: its script may still run, as a cancelled
single call's may.
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
        try:
            replies = await self._pipeline(batch)
            missing = [(call, i) for i, call in enumerate(batch)
                       if isinstance(replies[i], NoScriptError)]
            if missing:
                # A restarted or flushed Redis: load each script once, run those again.
                for script in {id(call.script): call.script for call, _ in missing}.values():
                    await script.load(self._r)
                again = await self._pipeline([call for call, _ in missing])
                for (_, i), reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except asyncio.CancelledError:
            for call in batch:
                call.future.cancel()
            raise
        except Exception as exc:  # the round trip failed: every call of it did
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)
            return
        for call, reply in zip(batch, replies, strict=True):
            if call.future.done():
                continue  # its caller stopped waiting
            if isinstance(reply, Exception):
                call.future.set_exception(reply)
            else:
                call.future.set_result(reply)

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
