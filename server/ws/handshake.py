"""Upgrade-time decisions: who is asking (API key), for what (path, query), and the answers.

Rejections are plain HTTP responses with `{"error":{"code","message"}}` before any 101, so a
client library sees a status code it can act on (401, 402, 429 + Retry-After, 400, 503).
"""

from __future__ import annotations

import email.utils
import http
from urllib.parse import parse_qsl, urlsplit

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

# The refusal is the error catalogue's (server/protocol/errors.py), shared with HTTP routes.
from server.protocol.errors import ErrorBody, ErrorEnvelope
from server.protocol.errors import Rejected as Rejected
from server.sessions.upgrade import UpgradeRequest

_encoder = msgspec.json.Encoder()


class _ErrorFrame(msgspec.Struct, tag="error", tag_field="type"):
    code: str
    message: str
    retryable: bool = False


def error_frame_payload(code: str, message: str, retryable: bool = False) -> bytes:
    return _encoder.encode(_ErrorFrame(code, message[:200], retryable))


def json_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    body = _encoder.encode(ErrorEnvelope(ErrorBody(code, message)))
    hdrs = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
        ]
    )
    for name, value in (headers or {}).items():
        hdrs[name] = value
    return Response(status, http.HTTPStatus(status).phrase, hdrs, body)


class BadUpgrade(ValueError):
    """The upgrade request itself is malformed (HTTP 400 `bad_request`)."""


# Headers we read that may appear once: with two, which one is meant is ambiguous (and a proxy
# may have added one), so the request is refused instead of guessed at.
SINGLE_VALUED_HEADERS = ("Authorization",)


def parse_upgrade(request: Request) -> UpgradeRequest:
    """Raises BadUpgrade for a header we read that is repeated."""
    for name in SINGLE_VALUED_HEADERS:
        if len(request.headers.get_all(name)) > 1:
            raise BadUpgrade(f"duplicate {name} header")
    parts = urlsplit(request.path)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    return UpgradeRequest(
        path=parts.path,
        query=query,
        api_key=extract_api_key(request.headers, query),
        headers=request.headers,
    )


def extract_api_key(headers: Headers, query: dict[str, str]) -> str | None:
    """Bearer header (or `Token`, Deepgram's scheme), then `Sec-WebSocket-Protocol: token,
    <key>` (browsers), then ?api_key=."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() in ("bearer", "token") and value.strip():
            return value.strip()
    protocols = [
        p.strip()
        for value in headers.get_all("Sec-WebSocket-Protocol")
        for p in value.split(",")
    ]
    if len(protocols) >= 2 and protocols[0] == "token" and protocols[1]:
        return protocols[1]
    key = query.pop("api_key", None)
    return key or None
