"""Engine protocols. Engines are shared per model across sessions; streams are per utterance.

Word and hypothesis timings are in ms relative to the start of the utterance's audio; the
session machine turns them into session time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class WordTiming:
    word: str
    start_ms: int
    end_ms: int
    confidence: float


@dataclass(slots=True)
class Hypothesis:
    text: str
    words: list[WordTiming] = field(default_factory=list)


class EngineError(Exception):
    """An engine could not produce a result; `retryable`: the same call may work later."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class EngineUnavailable(EngineError):
    """The engine refuses work right now (circuit open, shutting down)."""


class TranscriptionStream(Protocol):
    """One utterance of 16-bit little-endian mono PCM at the engine's sample rate."""

    async def feed(self, pcm: bytes) -> Hypothesis | None:
        """Add audio; return an interim hypothesis when the engine has a new one, else None.

        Awaiting this is the back pressure: a slow engine makes it slow, never buffers unboundedly.
        """
        ...

    async def finish(self) -> Hypothesis:
        """End of utterance: return the final hypothesis. The stream is closed afterwards."""
        ...

    async def aclose(self) -> None:
        """Abandon the utterance (session closed, clear); must be safe to call at any time."""
        ...


class Transcriber(Protocol):
    name: str
    sample_rate: int
    supports_interim: bool

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def open_stream(
        self, *, language: str, session_id: str, utterance_id: int
    ) -> TranscriptionStream: ...


# --- text to speech ---------------------------------------------------------------------------


class Synthesizer(Protocol):
    """Text in, 16-bit little-endian mono PCM out at `sample_rate`, streamed as produced.

    `synthesize` is an async generator: the consumer iterates it and cancelling the consumer
    (barge-in) must stop the synthesis and free what it held (process, connection, slot).
    A text is at most `max_chars` characters / `max_tokens` tokens (the model's context
    limit); the session's chunker guarantees it.
    """

    name: str
    sample_rate: int
    max_chars: int
    max_tokens: int | None

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def synthesize(
        self, text: str, *, voice: str | None, language: str
    ) -> AsyncIterator[bytes]: ...
