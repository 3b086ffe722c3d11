"""Who is asking, and the ports that decide whether they may: the contract between an
endpoint's edge (the WebSocket upgrade, an HTTP route, a call whose key came in-band) and the
admission policy behind it (billing, or static keys). The edges know these types only, never
the policy's implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.protocol.errors import Rejected


@dataclass(frozen=True, slots=True)
class TenantLimits:
    max_concurrent_sessions: int
    audio_seconds_per_minute: int
    requests_per_second: int
    burst: int


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    key_id: str
    limits: TenantLimits | None = None  # None: no limits (static keys, anonymous)


ANONYMOUS = Principal(tenant_id="anonymous", key_id="anonymous")


class Authenticator(Protocol):
    async def authenticate(self, api_key: str | None) -> Principal | None:
        """The caller's principal, or None if the key is missing or not valid."""
        ...


class AdmissionPolicy(Protocol):
    """Per-key checks after authentication (rate limits), at a WebSocket upgrade, an HTTP
    request, or a call's in-band `start`: a refusal from the error catalogue, or None."""

    async def check_upgrade(self, principal: Principal) -> Rejected | None: ...
