"""Shared by every upstream client (ASR, TTS, LLM, vision): one failed attempt that another
attempt may fix, and the server's Retry-After hint."""

from __future__ import annotations


class Retryable(Exception):
    """An attempt failed in a way another attempt may not (internal to a retry loop)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds; the HTTP-date form is not worth parsing (plain backoff)."""
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None
