"""Who is calling: API keys are compared by SHA-256 digest, never stored or logged in clear."""

from __future__ import annotations

import hashlib
import hmac

# The identity types are the admission contract's (server/protocol/admission.py); billing
# resolves keys to them. Re-exported: callers name them from here as well.
from server.protocol.admission import ANONYMOUS, Authenticator, Principal, TenantLimits

__all__ = ["ANONYMOUS", "Authenticator", "Principal", "StaticKeyAuthenticator", "TenantLimits",
           "key_digest"]


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


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
