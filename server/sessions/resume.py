"""Resumable sessions (docs/protocol.md, "Resuming a session"): what a session keeps so a
client whose connection dropped, or whose node drained or died, carries on where it was, on
any node, within `resume_window_s`.

ASR: a `ResumePoint` is written at quiet points (no utterance open or owed: the VAD can start
afresh there) and before every usage report: the client's audio before `offset` is taken in
for good (its finals were sent, and kept here for replay), audio before `billed_offset` is
paid for. A resume claims the point by raising its `epoch`: a connection still writing under
an older epoch has been superseded, and its writes are refused.

TTS: a `TtsResumePoint` holds the text not yet delivered as audio (chunks not yet done, the
newest done ones for a client that missed their `audio_done`, the text still buffered), with
which chunks were already charged.

The store is a port: Redis (every node sees it; server/sessions/resume_redis.py) or memory
(one process: a client that reconnects to the same server).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import msgspec

from server.protocol.errors import Rejected, refuse
from server.sessions.asr_params import AsrParams
from streamgate_protocol import messages as m

FinalMessage = m.Transcript | m.UtteranceEnd


class ResumePoint(msgspec.Struct, kw_only=True, frozen=True, tag="asr"):
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


class TtsParamsPoint(msgspec.Struct, kw_only=True, frozen=True):
    """A TTS session's parameters (server/sessions/tts.py `TtsParams`)."""

    model: str
    voice: str | None
    language: str
    encoding: m.Encoding
    sample_rate: int


class TtsChunkPoint(msgspec.Struct, frozen=True, array_like=True):
    chunk_id: int
    text: str
    charged: bool  # its characters were metered: never again


class TtsResumePoint(msgspec.Struct, kw_only=True, frozen=True, tag="tts"):
    session_id: str
    tenant_id: str
    params: TtsParamsPoint
    epoch: int = 0
    next_chunk_id: int = 1
    # Chunks whose audio may not have reached the client, oldest first: the newest done ones
    # (flow_control/replay.py bounds how many) and every one not done yet.
    chunks: list[TtsChunkPoint] = msgspec.field(default_factory=list)
    buffered: str = ""  # text without a sentence end yet


AnyResumePoint = ResumePoint | TtsResumePoint


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


@dataclass(frozen=True, slots=True)
class TtsResumeStart:
    """Where a resumed TTS machine starts: the chunks to speak again (after the client's
    `last_chunk_id`), the next new chunk's id and the text still buffered."""

    next_chunk_id: int
    chunks: list[TtsChunkPoint]
    buffered: str


class ResumeStore(Protocol):
    async def save(self, token: str, point: AnyResumePoint, ttl_s: float) -> bool:
        """Store `point` under `token` for `ttl_s`; False if a resume with a newer epoch took
        the session over (this writer is superseded)."""
        ...

    async def claim(self, token: str, tenant_id: str, ttl_s: float) -> AnyResumePoint | None:
        """Take the session over for a new connection: its point, epoch raised and stored; None
        if the token is unknown, expired or another tenant's."""
        ...

    async def forget(self, token: str, epoch: int, ttl_s: float) -> None:
        """The session ended for good (a normal close, an error): it cannot be resumed. Only
        the holder of the current epoch (or of a token with nothing stored) may. What is left
        for `ttl_s` is a tombstone under `epoch + 1`: a save of the finished session that
        reaches the store after this (a batched one) is refused, not stored again."""
        ...

    async def aclose(self) -> None:
        """Send the saves still waiting and wait for those in flight: the server calls it
        once its sessions ended, before the store's client closes."""
        ...


class MemoryResumeStore:
    """One process's sessions, for a server without Redis. Bounded: the oldest entry goes when
    `max_entries` are kept. An entry is (epoch, point, deadline); a forgotten session's is a
    tombstone, (epoch + 1, None, deadline), as in Redis (resume_redis.py)."""

    def __init__(self, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._points: OrderedDict[str, tuple[int, AnyResumePoint | None, float]] = OrderedDict()
        self._max = max_entries
        self._clock = clock

    def _live(self, token: str) -> tuple[int, AnyResumePoint | None, float] | None:
        entry = self._points.get(token)
        if entry is None:
            return None
        if entry[2] <= self._clock():
            del self._points[token]
            return None
        return entry

    def _put(self, token: str, epoch: int, point: AnyResumePoint | None, ttl_s: float) -> None:
        self._points[token] = (epoch, point, self._clock() + ttl_s)
        self._points.move_to_end(token)
        while len(self._points) > self._max:
            self._points.popitem(last=False)

    async def save(self, token: str, point: AnyResumePoint, ttl_s: float) -> bool:
        current = self._live(token)
        if current is not None and current[0] > point.epoch:
            return False
        self._put(token, point.epoch, point, ttl_s)
        return True

    async def claim(self, token: str, tenant_id: str, ttl_s: float) -> AnyResumePoint | None:
        current = self._live(token)
        if current is None or current[1] is None or current[1].tenant_id != tenant_id:
            return None
        claimed = msgspec.structs.replace(current[1], epoch=current[0] + 1)
        self._points[token] = (claimed.epoch, claimed, self._clock() + ttl_s)
        return claimed

    async def forget(self, token: str, epoch: int, ttl_s: float) -> None:
        current = self._live(token)
        if current is None or current[0] == epoch:
            self._put(token, epoch + 1, None, ttl_s)

    async def aclose(self) -> None:
        """Nothing to send: every save is stored as it is made."""


P = TypeVar("P", ResumePoint, TtsResumePoint)
log = logging.getLogger("streamgate.resume")


async def claim_for_resume(store: ResumeStore | None, query: Mapping[str, str], tenant_id: str,
                           *, kind: type[P], last_param: str,
                           window_s: float) -> tuple[P, int] | Rejected:
    """The resume of a client at the upgrade: its point (claimed: any other connection of the
    session is superseded) and the newest id it says it has (`last_param`), or the refusal.
    Unknown, expired, another tenant's and another kind's tokens get one answer."""
    try:
        last = int(query.get(last_param, "0"))
    except ValueError:
        last = -1
    if last < 0:
        return refuse("bad_request", f"{last_param} must be a whole number >= 0")
    token = query.get("resume_token", "")
    if store is None or not token:
        return refuse("resume_not_found", "this server keeps no resumable sessions")
    try:
        point = await store.claim(token, tenant_id, window_s)
    except Exception:
        log.exception("resume store unavailable")
        return refuse("internal_error", "resume store unavailable; retry")
    if not isinstance(point, kind):
        return refuse("resume_not_found", "unknown or expired resume_token; start a new session")
    return point, last
