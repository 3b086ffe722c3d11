"""The error catalogue: one row per error code, used by every endpoint.

A refusal before a session exists is an HTTP response (`http_status`, `Retry-After`); once a
WebSocket session runs, the same code ends it with `close_code` (docs/protocol.md, "Close
codes"). The WebSocket upgrade, the HTTP model routes and a telephony call refused after its
in-band `start` all read this table instead of keeping their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Final

import msgspec


@dataclass(frozen=True, slots=True)
class ErrorCode:
    code: str
    http_status: int  # the answer when the code refuses a request or an upgrade
    close_code: int  # the close code when the code ends a running session
    retryable: bool
    retry_after_s: int | None = None  # Retry-After sent with the refusal, unless given one


def _table(*rows: ErrorCode) -> Mapping[str, ErrorCode]:
    return MappingProxyType({row.code: row for row in rows})


CATALOGUE: Final = _table(
    ErrorCode("bad_request", 400, 4400, False),
    ErrorCode("bad_config", 400, 4400, False),
    ErrorCode("unauthorized", 401, 4001, False),
    ErrorCode("key_revoked", 401, 4001, False),
    ErrorCode("insufficient_balance", 402, 4002, False),
    ErrorCode("not_found", 404, 1008, False),
    # A resume token that is unknown, expired, or another tenant's (one answer for all three:
    # a token's existence is not revealed); or a client that missed finals no longer kept.
    ErrorCode("resume_not_found", 404, 1008, False),  # refused at the upgrade only
    # The session was resumed on another connection: this one is superseded.
    ErrorCode("session_resumed", 409, 4409, False),
    ErrorCode("rate_limited", 429, 4029, True, 1),
    ErrorCode("internal_error", 500, 1011, True),
    ErrorCode("billing_unavailable", 503, 1011, True, 2),
    ErrorCode("auth_unavailable", 503, 1011, True, 2),
    ErrorCode("draining", 503, 1001, True, 1),
    ErrorCode("overloaded", 503, 1011, True, 1),
    ErrorCode("idle_timeout", 408, 4008, False),
    ErrorCode("policy_violation", 400, 1008, False),
    ErrorCode("client_not_reading", 400, 1008, False),
    ErrorCode("protocol_error", 400, 1002, False),
    ErrorCode("invalid_utf8", 400, 1007, False),
    ErrorCode("frame_too_big", 413, 1009, False),
)

# What a code the table does not know gets: a policy close, a server-side failure over HTTP.
UNKNOWN_CLOSE_CODE: Final = 1008
UNKNOWN_HTTP_STATUS: Final = 500


def close_code(code: str) -> int:
    """The close code that ends a running session for `code`."""
    row = CATALOGUE.get(code)
    return row.close_code if row is not None else UNKNOWN_CLOSE_CODE


def http_status(code: str) -> int:
    row = CATALOGUE.get(code)
    return row.http_status if row is not None else UNKNOWN_HTTP_STATUS


class ErrorBody(msgspec.Struct):
    code: str  # a catalogue code
    message: str


class ErrorEnvelope(msgspec.Struct):
    """The body of every refusal, HTTP or upgrade: `{"error": {"code", "message"}}`."""

    error: ErrorBody


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refusal before the session: an HTTP status and `{"error":{"code","message"}}`."""

    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def close_code(self) -> int:
        """The same refusal once the socket is upgraded (a key that came in-band)."""
        return close_code(self.code)


def refuse(code: str, message: str, retry_after_s: float | None = None) -> Rejected:
    """The refusal for `code` as the table says: its status, and Retry-After for a retryable
    code (`retry_after_s` rounded up to a whole second, at least 1, else the table's)."""
    row = CATALOGUE[code]
    headers: dict[str, str] = {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    elif row.retry_after_s is not None:
        headers["Retry-After"] = str(row.retry_after_s)
    return Rejected(row.http_status, code, message, headers)


class RefusedError(Exception):
    """An exception that refuses a request with a catalogue code: the layer that raises it
    (billing) names the code; the edge that catches it (WebSocket upgrade, HTTP route, call)
    turns it into its own answer through the table."""

    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "refused"

    def __init__(self, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def message(self) -> str:
        return str(self) or self.default_message


def rejection(exc: RefusedError) -> Rejected:
    return refuse(exc.code, exc.message, exc.retry_after_s)


# A session run behind one HTTP request (POST /v1/asr/transcribe, /v1/tts/synthesize) that
# ended before its answer: these close codes are the caller's doing (its wallet, its rate, its
# input) and answer with their refusal's status; any other end is the engine's or ours.
_CALLER_CLOSES: Final = {4002: "insufficient_balance", 4029: "rate_limited", 4400: "bad_config"}


def http_status_of_close(close: int | None, default: int = 502) -> int:
    """The HTTP status of a request whose session ended with `close` before the answer."""
    code = _CALLER_CLOSES.get(close or 0)
    return CATALOGUE[code].http_status if code is not None else default
