"""The two meters of a call: caller audio (ASR model, `audio_ms`) and agent speech (TTS model,
`characters`), opened together and settled once each however the call ends."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from server.billing.meter import SessionMeter, UsageReport
from server.protocol.errors import Rejected

__all__ = ["CallMeters", "MeterRefused", "ObservedMeter"]


class ObservedMeter:
    """A meter that settles once, however many parts of the call ask, and says when it has:
    the ASR runner settles the caller-audio meter on its own schedule (after the last final),
    and the call's summary waits for it."""

    def __init__(self, inner: SessionMeter) -> None:
        self.inner = inner
        self.settled = asyncio.Event()
        self.final: UsageReport | None = None
        self._lock = asyncio.Lock()

    def accept(self, audio_ms: int) -> None:
        self.inner.accept(audio_ms)

    def drop(self, audio_ms: int) -> None:
        self.inner.drop(audio_ms)

    @property
    def exhausted(self) -> bool:
        return self.inner.exhausted

    async def top_up(self) -> bool:
        return await self.inner.top_up()

    async def report(self) -> UsageReport:
        return self.final or await self.inner.report()

    async def settle(self) -> UsageReport:
        async with self._lock:
            if self.final is None:
                try:
                    self.final = await self.inner.settle()
                finally:
                    self.settled.set()
            return self.final


@dataclass(slots=True)
class CallMeters:
    session_id: str
    asr: ObservedMeter  # caller audio, unit audio_ms
    tts: ObservedMeter  # agent speech, unit characters

    async def settle(self) -> None:
        """Both, whatever happens to either (a call refused after the meters opened)."""
        for meter in (self.asr, self.tts):
            with contextlib.suppress(Exception):
                await meter.settle()


class MeterRefused(Exception):
    """Meters could not be opened; `status`/`code` as at the upgrade, `close_code` after it."""

    def __init__(self, status: int, code: str, message: str, close_code: int,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.close_code = status, code, close_code
        self.headers = headers or {}

    def rejected(self) -> Rejected:
        return Rejected(self.status, self.code, str(self), self.headers)
