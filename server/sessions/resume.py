"""Resumable ASR sessions (docs/protocol.md, "Resuming a session"): what a session keeps so a
client whose connection dropped, or whose node drained or died, carries on where it was, on
any node, within `asr.session.resume_window_s`.

A `ResumePoint` is written at quiet points (no utterance open or owed: the VAD can start
afresh there) and before every usage report: the client's audio before `offset` is taken in
for good (its finals were sent, and kept here for replay), audio before `billed_offset` is
paid for. A resume claims the point by raising its `epoch`: a connection still writing under
an older epoch has been superseded, and its writes are refused.

The store is a port: Redis (every node sees it; server/sessions/resume_redis.py) or memory
(one process: a client that reconnects to the same server).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from server.protocol import messages as m
from server.sessions.asr_params import AsrParams

FinalMessage = m.Transcript | m.UtteranceEnd


class ResumePoint(msgspec.Struct, kw_only=True, frozen=True):
    session_id: str
    tenant_id: str
    params: AsrParams
    epoch: int = 0
    offset: int = 0  # client stream byte the session continues at
    at_ms: int = 0  # audio time at `offset`
    next_utterance_id: int = 1
    billed_offset: int = 0  # client stream bytes already reported to the wallet
    # (utterance_id, message) of the newest finals, oldest first (flow_control/replay.py).
    finals: list[tuple[int, FinalMessage]] = msgspec.field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ResumeStart:
    """Where a resumed session's machine starts: from the point, and from what the client says
    it received (`last_utterance_id`: finals up to it are never sent again)."""

    offset: int
    at_ms: int
    next_utterance_id: int
    billed_offset: int
    last_utterance_id: int
    finals: list[tuple[int, FinalMessage]] = field(default_factory=list)


class ResumeStore(Protocol):
    async def save(self, token: str, point: ResumePoint, ttl_s: float) -> bool:
        """Store `point` under `token` for `ttl_s`; False if a resume with a newer epoch took
        the session over (this writer is superseded)."""
        ...

    async def claim(self, token: str, tenant_id: str, ttl_s: float) -> ResumePoint | None:
        """Take the session over for a new connection: its point, epoch raised and stored; None
        if the token is unknown, expired or another tenant's."""
        ...

    async def forget(self, token: str, epoch: int) -> None:
        """The session ended for good (a normal close, an error): it cannot be resumed. Only
        the holder of the current epoch may."""
        ...


class MemoryResumeStore:
    """One process's sessions, for a server without Redis. Bounded: the oldest entry goes when
    `max_entries` are kept."""

    def __init__(self, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._points: OrderedDict[str, tuple[ResumePoint, float]] = OrderedDict()
        self._max = max_entries
        self._clock = clock

    def _live(self, token: str) -> ResumePoint | None:
        entry = self._points.get(token)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._points[token]
            return None
        return entry[0]

    async def save(self, token: str, point: ResumePoint, ttl_s: float) -> bool:
        current = self._live(token)
        if current is not None and current.epoch > point.epoch:
            return False
        self._points[token] = (point, self._clock() + ttl_s)
        self._points.move_to_end(token)
        while len(self._points) > self._max:
            self._points.popitem(last=False)
        return True

    async def claim(self, token: str, tenant_id: str, ttl_s: float) -> ResumePoint | None:
        current = self._live(token)
        if current is None or current.tenant_id != tenant_id:
            return None
        claimed = msgspec.structs.replace(current, epoch=current.epoch + 1)
        self._points[token] = (claimed, self._clock() + ttl_s)
        return claimed

    async def forget(self, token: str, epoch: int) -> None:
        current = self._live(token)
        if current is not None and current.epoch == epoch:
            del self._points[token]
