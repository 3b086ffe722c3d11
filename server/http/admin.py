"""Admin API (bearer admin token): tenants, keys, top-ups, balances, usage, prices, reconcile.

Keys are shown once, in the response that creates them; only their SHA-256 is stored.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from server.billing.reconcile import reconcile
from server.billing.service import BillingService
from server.billing.store import IdempotencyConflict, TenantExists, UnknownTenant

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class NewTenant(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    tenant_id: str | None = None
    overdraft_micros: int = 0
    max_concurrent_sessions: int = 100
    audio_seconds_per_minute: int = 6000
    requests_per_second: int = 50
    burst: int = 100


class NewTopup(msgspec.Struct, forbid_unknown_fields=True):
    amount_micros: int
    idempotency_key: str | None = None


class NewPrice(msgspec.Struct, forbid_unknown_fields=True):
    micros_per_block: int
    block_units: int


async def _body(request: web.Request, typ: type[Any]) -> Any:
    try:
        return msgspec.json.decode(await request.read(), type=typ)
    except msgspec.DecodeError as exc:
        raise web.HTTPBadRequest(
            text=msgspec.json.encode({"error": {"code": "bad_request", "message": str(exc)}})
            .decode(), content_type="application/json",
        ) from None


def _date(value: str | None) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise web.HTTPBadRequest(text='{"error":{"code":"bad_request","message":"dates are '
                                      'YYYY-MM-DD"}}', content_type="application/json") from None


def add_admin_routes(app: web.Application, billing: BillingService, token: str) -> None:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/admin/"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error(401, "unauthorized", "admin token required")
        return await handler(request)

    app.middlewares.append(admin_auth)
    store = billing.store
    assert store is not None

    async def create_tenant(request: web.Request) -> web.Response:
        body: NewTenant = await _body(request, NewTenant)
        try:
            tenant = await store.create_tenant(
                body.tenant_id, body.name, overdraft_micros=body.overdraft_micros,
                max_concurrent_sessions=body.max_concurrent_sessions,
                audio_seconds_per_minute=body.audio_seconds_per_minute,
                requests_per_second=body.requests_per_second, burst=body.burst,
            )
        except TenantExists as exc:
            return error(409, "conflict", str(exc))
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        return web.json_response(msgspec.to_builtins(tenant), status=201)

    async def get_tenant(request: web.Request) -> web.Response:
        tenant = await store.tenant(request.match_info["tenant"])
        if tenant is None:
            return error(404, "not_found", "no such tenant")
        return web.json_response(msgspec.to_builtins(tenant))

    async def issue_key(request: web.Request) -> web.Response:
        try:
            issued = await store.issue_key(request.match_info["tenant"])
        except UnknownTenant:
            return error(404, "not_found", "no such tenant")
        return web.json_response(
            {"key_id": issued.key_id, "prefix": issued.prefix, "api_key": issued.key},
            status=201,
        )

    async def revoke_key(request: web.Request) -> web.Response:
        if not await store.revoke_key(request.match_info["key_id"]):
            return error(404, "not_found", "no such key")
        return web.json_response({"key_id": request.match_info["key_id"], "revoked": True})

    async def topup(request: web.Request) -> web.Response:
        body: NewTopup = await _body(request, NewTopup)
        key = request.headers.get("Idempotency-Key") or body.idempotency_key
        if not key:
            return error(400, "bad_request", "an Idempotency-Key header (or field) is required")
        try:
            result = await billing.topup(request.match_info["tenant"], body.amount_micros, key)
        except UnknownTenant:
            return error(404, "not_found", "no such tenant")
        except IdempotencyConflict as exc:
            return error(409, "idempotency_conflict", str(exc))
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        return web.json_response(
            {"topup_id": result.topup_id, "amount_micros": result.amount_micros,
             "created": result.created},
            status=201 if result.created else 200,
        )

    async def balance(request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        try:
            pg = await store.balance(tenant)
        except UnknownTenant:
            return error(404, "not_found", "no such tenant")
        assert billing.cache is not None
        spendable = await billing.cache.spendable(tenant)
        return web.json_response({"tenant_id": tenant, "balance_micros": pg,
                                  "spendable_micros": spendable})

    async def usage(request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        rows = await store.usage_summary(tenant, _date(request.query.get("since")),
                                         _date(request.query.get("until")))
        return web.json_response(
            {"tenant_id": tenant,
             "usage": [{"day": r.day.isoformat(), "model": r.model, "unit": r.unit,
                        "units": r.units, "cost_micros": r.cost_micros} for r in rows]}
        )

    async def set_price(request: web.Request) -> web.Response:
        body: NewPrice = await _body(request, NewPrice)
        try:
            price = await store.set_price(request.match_info["model"], request.match_info["unit"],
                                          body.micros_per_block, body.block_units)
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        await billing.refresh_prices()
        return web.json_response(msgspec.to_builtins(price))

    async def run_reconcile(_: web.Request) -> web.Response:
        report = await reconcile(store, billing.redis)
        return web.json_response({"ok": report.ok, "problems": report.problems},
                                 status=200 if report.ok else 409)

    r = app.router
    r.add_post("/admin/tenants", create_tenant)
    r.add_get("/admin/tenants/{tenant}", get_tenant)
    r.add_post("/admin/tenants/{tenant}/keys", issue_key)
    r.add_delete("/admin/keys/{key_id}", revoke_key)
    r.add_post("/admin/tenants/{tenant}/topups", topup)
    r.add_get("/admin/tenants/{tenant}/balance", balance)
    r.add_get("/admin/tenants/{tenant}/usage", usage)
    r.add_put("/admin/prices/{model}/{unit}", set_price)
    r.add_get("/admin/reconcile", run_reconcile)
