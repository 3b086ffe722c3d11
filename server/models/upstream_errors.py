"""What a client is told when an upstream fails: the upstream's configured name and one cause
from a small fixed vocabulary. Everything else (host, port, exception text, the upstream's own
error body) describes our network and our providers, not the client's request: it goes to the
server log only.

Shared by every upstream client: ASR and TTS engines (server/models), the LLM proxy
(server/llm) and the vision extraction models (server/vision).
"""

from __future__ import annotations

import aiohttp

CONNECT_FAILED = "connect failed"  # refused, unreachable, DNS, TLS handshake
TIMEOUT = "timeout"  # no answer (or no next piece of it) in time
CONNECTION_LOST = "connection lost"  # connected, then the connection broke mid-answer
BAD_RESPONSE = "bad response"  # answered, but not with what the API promises
PROVIDER_ERROR = "provider error"  # answered 200, then reported an error in the stream
REQUEST_FAILED = "request failed"  # the HTTP client could not send the request at all
CIRCUIT_OPEN = "circuit open"  # skipped: recent attempts failed
SATURATED = "no free slot"  # every connection slot to it is busy
NOT_RUNNING = "not running"  # the client is not started (or already shut down)


def bad_status(status: int) -> str:
    return f"bad status {status}"


def transport_cause(exc: BaseException) -> str:
    """The cause for an exception from the HTTP client (or a timeout around it)."""
    # ServerTimeoutError and ConnectionTimeoutError are TimeoutErrors too: timeout wins.
    if isinstance(exc, TimeoutError):
        return TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        return CONNECT_FAILED
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return CONNECTION_LOST
    return REQUEST_FAILED


def unavailable(name: str, cause: str) -> str:
    """The client-facing sentence: `provider 'local-vllm' unavailable: connect failed`."""
    return f"provider {name!r} unavailable: {cause}"


def rejected(name: str, status: int) -> str:
    """A 4xx other than 429: the upstream is healthy, it refuses this request."""
    return f"provider {name!r} rejected the request: {bad_status(status)}"
