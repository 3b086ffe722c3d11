"""Who is calling: API keys are compared by SHA-256 digest, never stored or logged in clear."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Protocol


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


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator(Protocol):
    async def authenticate(self, api_key: str | None) -> Principal | None:
        """The caller's principal, or None if the key is missing or not valid."""
        ...


class StaticKeyAuthenticator:
    """Keys from config (`auth.key_sha256`); the billing layer brings per-tenant keys."""

    def __init__(self, digests: list[str], *, allow_anonymous: bool) -> None:
        self._digests = [d.lower() for d in digests]
        self._allow_anonymous = allow_anonymous

    async def authenticate(self, api_key: str | None) -> Principal | None:
        if api_key is None:
            return ANONYMOUS if self._allow_anonymous else None
        digest = key_digest(api_key)
        for known in self._digests:
            if hmac.compare_digest(digest, known):
                return Principal(tenant_id="static", key_id=digest[:12])
        return None
