"""Admin API (bearer admin token): tenants, keys, top-ups, balances, usage, prices, reconcile.

Keys are shown once, in the response that creates them; only their SHA-256 is stored.
Bodies are checked against the bounds of the schema (and of the wallet cache) before anything
reaches a database: 400 `bad_request` naming the field. A database that cannot be reached is
503 `billing_unavailable`; every error is the one JSON shape of server/http/errors.py.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import asyncpg
import msgspec
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.billing.meter import BillingUnavailable
from server.billing.reconcile import reconcile
from server.billing.service import BillingService
from server.billing.store import (
    MAX_MICROS,
    MAX_TENANT_LIMIT,
    TENANT_ID,
    IdempotencyConflict,
    TenantExists,
    UnknownTenant,
)
from server.http.errors import ApiError, error_response

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What a PostgreSQL or Redis that is down (stopped, restarting, unreachable) raises; anything
# else escaping a handler is a bug, answered 500 `internal_error` (still JSON) and logged.
STORE_DOWN: tuple[type[BaseException], ...] = (
    OSError,  # connection refused / reset (ConnectionError) while (re)connecting
    TimeoutError,
    asyncpg.PostgresConnectionError,  # the connection died under a query
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    RedisConnectionError,
    RedisTimeoutError,
    BillingUnavailable,
)
RETRY_AFTER = {"Retry-After": "2"}

Micros = Annotated[int, msgspec.Meta(ge=0, le=MAX_MICROS)]
PositiveMicros = Annotated[int, msgspec.Meta(ge=1, le=MAX_MICROS)]
# The rate limiter needs at least one session, request and burst slot (ratelimit.py).
PositiveLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_TENANT_LIMIT)]
Limit = Annotated[int, msgspec.Meta(ge=0, le=MAX_TENANT_LIMIT)]


def error(status: int, code: str, message: str) -> web.Response:
    return error_response(status, code, message)


class NewTenant(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    tenant_id: Annotated[str, msgspec.Meta(pattern=TENANT_ID.pattern)] | None = None
    overdraft_micros: Micros = 0
    max_concurrent_sessions: PositiveLimit = 100
    audio_seconds_per_minute: Limit = 6000
    requests_per_second: PositiveLimit = 50
    burst: PositiveLimit = 100


class NewTopup(msgspec.Struct, forbid_unknown_fields=True):
    amount_micros: PositiveMicros
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


class NewPrice(msgspec.Struct, forbid_unknown_fields=True):
    micros_per_block: Micros
    block_units: PositiveMicros


async def _body(request: web.Request, typ: type[Any]) -> Any:
    try:
        return msgspec.json.decode(await request.read(), type=typ)
    except msgspec.DecodeError as exc:
        # ValidationError messages carry the field path: "... - at `$.amount_micros`".
        raise ApiError(400, "bad_request", str(exc)) from None


def _date(request: web.Request, name: str) -> dt.date | None:
    value = request.query.get(name)
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ApiError(400, "bad_request",
                       f"{name}: dates are YYYY-MM-DD, got {value[:40]!r}") from None


def _check_path(request: web.Request) -> None:
    """Path values no row can have never reach PostgreSQL (a NUL byte is an encoding error
    there, not an empty result)."""
    tenant = request.match_info.get("tenant")
    if tenant is not None and not TENANT_ID.fullmatch(tenant):
        raise ApiError(404, "not_found", "no such tenant")
    key_id = request.match_info.get("key_id")
    if key_id is not None and ("\x00" in key_id or len(key_id) > 200):
        raise ApiError(404, "not_found", "no such key")
    for name in ("model", "unit"):
        value = request.match_info.get(name)
        if value is not None and ("\x00" in value or len(value) > 200):
            raise ApiError(400, "bad_request", f"{name}: no NUL bytes, at most 200 characters")


def add_admin_routes(app: web.Application, billing: BillingService, token: str) -> None:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/admin/"):
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return error(401, "unauthorized", "admin token required")
        try:
            _check_path(request)
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.headers)
        except web.HTTPException:
            raise  # aiohttp's own (413 body too large...): the API error middleware shapes it
        except STORE_DOWN as exc:
            log.warning("admin %s %s: billing store unavailable: %s: %s", request.method,
                        request.path, type(exc).__name__, exc)
            return error_response(503, "billing_unavailable",
                                  "the billing database is unavailable; retry shortly",
                                  RETRY_AFTER)
        except Exception:
            log.exception("admin %s %s failed", request.method, request.path)
            return error(500, "internal_error", "internal error")

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
        if not await billing.revoke_key(request.match_info["key_id"]):  # ends its sessions
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
        since, until = _date(request, "since"), _date(request, "until")
        try:
            rows = await store.usage_summary(tenant, since, until)
        except UnknownTenant:
            return error(404, "not_found", "no such tenant")
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
