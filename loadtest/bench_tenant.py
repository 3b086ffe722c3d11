"""The bench's billing tenant, made through the admin API of a streamgate started by the bench.

The dev tenant `streamgate serve` can create has the default limits of a new tenant (100
concurrent sessions, 6,000 audio seconds a minute, 50 upgrades/s per key): the bench would be
measuring those. Tenant limits live in PostgreSQL, not in the config, so the bench creates its
own tenant with limits no run reaches, funds it, and streams with its key: every session still
goes through the full admission (key lookup, GCRA rate limit and concurrent-session count in
Redis, a lease from the wallet) and metering (usage reports, top-ups, settlement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

TENANT_ID = "bench"
LIMITS = {
    "max_concurrent_sessions": 1_000_000,
    "audio_seconds_per_minute": 2_000_000_000,  # PostgreSQL integer
    "requests_per_second": 1_000_000,
    "burst": 1_000_000,
}
FUNDS_MICROS = 10**12  # a lease reserves 30 s of audio per session: never the limit here
TIMEOUT = aiohttp.ClientTimeout(total=30)


class AdminError(RuntimeError):
    pass


@dataclass(frozen=True)
class Balance:
    balance_micros: int  # PostgreSQL (what the flusher has charged so far)
    spendable_micros: int | None  # the Redis wallet cache, less open leases (None: no wallet)


class Admin:
    def __init__(self, http_port: int, token: str, host: str = "127.0.0.1") -> None:
        self.http_port = http_port
        self.base = f"http://{host}:{http_port}"
        self.headers = {"Authorization": f"Bearer {token}"}

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
                    extra: dict[str, str] | None = None) -> dict[str, Any]:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http, http.request(
            method, self.base + path, json=body, headers={**self.headers, **(extra or {})}
        ) as resp:
            text = await resp.text()
            if resp.status >= 300:
                raise AdminError(f"{method} {path}: HTTP {resp.status} {text[:200]}")
            data: dict[str, Any] = await resp.json(content_type=None)
            return data

    async def create_bench_tenant(self) -> str:
        """Create and fund the bench tenant; return a new API key for it."""
        await self._call("POST", "/admin/tenants",
                         {"tenant_id": TENANT_ID, "name": "loadtest bench", **LIMITS})
        await self._call("POST", f"/admin/tenants/{TENANT_ID}/topups",
                         {"amount_micros": FUNDS_MICROS}, {"Idempotency-Key": "bench-funds"})
        issued = await self._call("POST", f"/admin/tenants/{TENANT_ID}/keys")
        return str(issued["api_key"])

    async def balance(self) -> Balance:
        data = await self._call("GET", f"/admin/tenants/{TENANT_ID}/balance")
        spendable = data.get("spendable_micros")
        return Balance(int(data["balance_micros"]),
                       None if spendable is None else int(spendable))
