"""Admin API errors against a real `streamgate serve` with billing on (issue 11, items 7 and 8).

Every refusal is the one JSON error shape, `{"error": {"code", "message"}}`, never a plain-text
500 and never an error nested in the message of another; bounds are checked before the database
(400 naming the field); a PostgreSQL or Redis that is down is 503 `billing_unavailable`. The
outage test runs its own PostgreSQL and Redis, which it stops: the suite's shared servers are
never touched.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from server.billing.store import MAX_MICROS, MAX_TENANT_LIMIT
from server.infra.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    Services,
)
from tests.e2e.conftest import ServerProcess, start_server
from tests.e2e.test_billing_e2e import (
    ADMIN_TOKEN,
    Admin,
    Billing,
    billing_env,
    billing_server,
    pg_state,
    try_open,
)
from tests.infra import embedded_services

pytestmark = pytest.mark.e2e
ADMIN_ERRORS_REDIS_DB = 6  # a Redis logical database of this module alone


@dataclass
class Reply:
    status: int
    content_type: str
    raw: bytes
    headers: dict[str, str]

    @property
    def body(self) -> Any:
        return json.loads(self.raw)


def send(base: str, method: str, path: str, data: bytes | None = None,
         headers: dict[str, str] | None = None) -> Reply:
    """One admin request with a raw body; any status comes back as a Reply."""
    req = urllib.request.Request(
        base + path, data=data, method=method,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return Reply(resp.status, resp.headers.get_content_type(), resp.read(),
                         dict(resp.headers))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.headers.get_content_type(), exc.read(), dict(exc.headers))


def assert_error(reply: Reply, status: int, code: str) -> str:
    """The reply is `status` with exactly {"error": {"code": code, "message": str}}; returns the
    message, which is itself never a JSON document (no error wrapped in another)."""
    assert reply.status == status, (reply.status, reply.raw[:300])
    assert reply.content_type == "application/json", (reply.content_type, reply.raw[:300])
    body = reply.body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    assert not message.lstrip().startswith("{"), message
    return str(message)


def assert_clean_log(srv: ServerProcess) -> None:
    text = "\n".join(srv.stderr_lines)
    assert "Traceback" not in text, text[-3000:]
    assert "DataError" not in text and "CheckViolation" not in text, text[-3000:]


def assert_no_request_traceback(srv: ServerProcess) -> None:
    """No request of the HTTP port failed with a traceback (aiohttp's "Error handling request",
    an exception out of a handler). Background loops (the usage flusher) may log their retries
    while a store is down: that is theirs to say, not a failed request."""
    for line in srv.stderr_lines:
        try:
            record = json.loads(line)
        except ValueError:
            assert "Traceback" not in line, line
            continue
        logger = str(record.get("logger", ""))
        if logger.startswith(("aiohttp", "server.http")):
            assert "exc" not in record and "Traceback" not in line, line


AdminServer = Billing


@pytest.fixture(scope="module")
def admin_server(redis_url: str, database_url: str) -> Iterator[Billing]:
    with billing_server(redis_url, database_url, ADMIN_ERRORS_REDIS_DB) as env:
        yield env


def topup(base: str, tenant: str, amount: Any, key: str | None = None) -> Reply:
    return send(base, "POST", f"/admin/tenants/{tenant}/topups",
                json.dumps({"amount_micros": amount}).encode(),
                {"Idempotency-Key": key or f"k-{uuid.uuid4().hex}"})


# --- item 7: bounds before the database ---------------------------------------------------------


@pytest.mark.parametrize("amount", [2**63, 2**63 - 1, 10**30, MAX_MICROS + 1, 0, -1])
async def test_topup_amount_out_of_bounds_is_400_naming_the_field(
        admin_server: AdminServer, amount: int) -> None:
    srv, admin = admin_server.server, admin_server.admin
    tenant = admin.create_tenant("bounds")
    reply = await asyncio.to_thread(topup, srv.http, tenant, amount)
    message = assert_error(reply, 400, "bad_request")
    assert "$.amount_micros" in message, message
    pg = await pg_state(admin_server.dsn, tenant)
    assert (pg.topups, pg.balance) == (0, 0)  # nothing written
    assert_clean_log(srv)


async def test_topup_that_would_lift_the_balance_over_the_maximum_is_400(
        admin_server: AdminServer) -> None:
    srv, admin = admin_server.server, admin_server.admin
    tenant = admin.create_tenant("ceiling")
    first = await asyncio.to_thread(topup, srv.http, tenant, MAX_MICROS)
    assert first.status == 201, first.raw
    again = await asyncio.to_thread(topup, srv.http, tenant, 1)
    message = assert_error(again, 400, "bad_request")
    assert "amount_micros" in message and str(MAX_MICROS) in message, message
    pg = await pg_state(admin_server.dsn, tenant)
    assert (pg.topups, pg.balance) == (MAX_MICROS, MAX_MICROS)  # the refused one rolled back
    assert admin.balance(tenant)["balance_micros"] == MAX_MICROS
    assert_clean_log(srv)


@pytest.mark.parametrize(("field", "value"), [
    ("max_concurrent_sessions", -1),
    # The schema allows 0, the rate limiter does not: such a tenant's upgrades would fail.
    ("max_concurrent_sessions", 0),
    ("requests_per_second", 0),
    ("burst", 0),
    ("max_concurrent_sessions", MAX_TENANT_LIMIT + 1),
    ("requests_per_second", -5),
    ("burst", 2**63),
    ("audio_seconds_per_minute", 10**30),
    ("overdraft_micros", -1),
    ("overdraft_micros", MAX_MICROS + 1),
    ("tenant_id", "bad id with spaces"),
    ("name", ""),
])
async def test_tenant_out_of_bounds_is_400_naming_the_field(
        admin_server: AdminServer, field: str, value: Any) -> None:
    srv = admin_server.server
    tenant_id = f"tb-{uuid.uuid4().hex[:12]}"
    body = {"name": "x", "tenant_id": tenant_id, field: value}
    reply = await asyncio.to_thread(send, srv.http, "POST", "/admin/tenants",
                                    json.dumps(body).encode())
    message = assert_error(reply, 400, "bad_request")
    assert f"$.{field}" in message, message
    got = await asyncio.to_thread(send, srv.http, "GET", f"/admin/tenants/{tenant_id}")
    assert_error(got, 404, "not_found")  # not created
    assert_clean_log(srv)


@pytest.mark.parametrize("limits", [
    {"max_concurrent_sessions": 1, "requests_per_second": 1, "burst": 1},
    {"max_concurrent_sessions": MAX_TENANT_LIMIT, "requests_per_second": MAX_TENANT_LIMIT,
     "burst": MAX_TENANT_LIMIT, "audio_seconds_per_minute": MAX_TENANT_LIMIT,
     "overdraft_micros": MAX_MICROS},
])
async def test_a_tenant_at_its_bounds_is_accepted_and_can_open_a_session(
        admin_server: AdminServer, limits: dict[str, int]) -> None:
    srv, admin = admin_server.server, admin_server.admin
    tenant_id = f"tok-{uuid.uuid4().hex[:12]}"
    body = {"name": "edge", "tenant_id": tenant_id, **limits}
    reply = await asyncio.to_thread(send, srv.http, "POST", "/admin/tenants",
                                    json.dumps(body).encode())
    assert reply.status == 201, reply.raw
    admin.tenants.append(tenant_id)
    assert {k: reply.body[k] for k in limits} == limits
    _, key = admin.issue_key(tenant_id)
    assert (await asyncio.to_thread(topup, srv.http, tenant_id, 1_000_000)).status == 201
    status, ready, _ = await try_open(srv, {"Authorization": f"Bearer {key}"})
    assert status == 101 and ready["type"] == "ready", ready
    assert_clean_log(srv)


@pytest.mark.parametrize(("field", "value"), [
    ("micros_per_block", 2**63), ("micros_per_block", -1), ("block_units", 0),
    ("block_units", 10**30),
])
async def test_price_out_of_bounds_is_400_naming_the_field(
        admin_server: AdminServer, field: str, value: int) -> None:
    srv = admin_server.server
    body = {"micros_per_block": 1000, "block_units": 60000, field: value}
    reply = await asyncio.to_thread(send, srv.http, "PUT", "/admin/prices/bounds-model/audio_ms",
                                    json.dumps(body).encode())
    message = assert_error(reply, 400, "bad_request")
    assert f"$.{field}" in message, message
    assert_clean_log(srv)


# --- item 8: one error object, not two ----------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "data"), [
    ("POST", "/admin/tenants/{t}/topups", b'{"amount_micros": "lots"}'),
    ("POST", "/admin/tenants/{t}/topups", b"amount=5"),
    ("POST", "/admin/tenants/{t}/topups", b""),
    ("POST", "/admin/tenants", b'{"name": 5}'),
    ("POST", "/admin/tenants", b"[not json"),
    ("PUT", "/admin/prices/m/audio_ms", b'{"micros_per_block": 1.5, "block_units": 1}'),
    ("GET", "/admin/tenants/{t}/usage?since=yesterday", None),
    ("GET", "/admin/tenants/{t}/usage?until=2026-13-01", None),
])
async def test_bad_request_is_the_inner_error_alone(
        admin_server: AdminServer, method: str, path: str, data: bytes | None) -> None:
    srv, admin = admin_server.server, admin_server.admin
    tenant = admin.create_tenant("wrap")
    reply = await asyncio.to_thread(send, srv.http, method, path.format(t=tenant), data,
                                    {"Idempotency-Key": "k1"})
    message = assert_error(reply, 400, "bad_request")
    assert "http_error" not in reply.raw.decode()
    if "usage" in path:
        assert "YYYY-MM-DD" in message, message


async def test_usage_of_unknown_tenant_is_404(admin_server: AdminServer) -> None:
    reply = await asyncio.to_thread(send, admin_server.server.http, "GET",
                                    "/admin/tenants/nosuch-tenant/usage")
    assert_error(reply, 404, "not_found")


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("DELETE", "/admin/keys/%00", 404, "not_found"),
    ("GET", "/admin/tenants/%00", 404, "not_found"),
    ("GET", "/admin/tenants/a%00b/balance", 404, "not_found"),
    ("GET", "/admin/tenants/ok%0A/usage", 404, "not_found"),
    ("POST", "/admin/tenants/%00/keys", 404, "not_found"),
    ("PUT", "/admin/prices/sp%00x/audio_ms", 400, "bad_request"),
])
async def test_path_values_no_row_can_have_never_reach_postgres(
    admin_server: AdminServer, method: str, path: str, status: int, code: str,
) -> None:
    """A NUL byte is an encoding error in PostgreSQL: it was a 500 with an asyncpg traceback
    (found by the hostile-input suite)."""
    data = b'{"micros_per_block": 1, "block_units": 1}' if method == "PUT" else None
    reply = await asyncio.to_thread(send, admin_server.server.http, method, path, data)
    assert_error(reply, status, code)
    assert_clean_log(admin_server.server)


# --- item 7: a store that is down is 503, not a plain-text 500 ---------------------------------


@pytest.fixture
def own_services(tmp_path: Path) -> Iterator[Services]:
    """A PostgreSQL and a Redis for this test alone (it stops them); never the suite's."""
    started = embedded_services(tmp_path)
    try:
        yield started
    finally:
        started.stop()


def admin_calls(tenant: str) -> list[tuple[str, str, bytes | None]]:
    return [
        ("GET", f"/admin/tenants/{tenant}/balance", None),
        ("GET", f"/admin/tenants/{tenant}", None),
        ("GET", f"/admin/tenants/{tenant}/usage", None),
        ("POST", f"/admin/tenants/{tenant}/topups", b'{"amount_micros": 1000}'),
        ("POST", "/admin/tenants", json.dumps({"name": "during-outage"}).encode()),
        ("POST", f"/admin/tenants/{tenant}/keys", None),
        ("GET", "/admin/reconcile", None),
    ]


async def test_postgres_or_redis_down_is_503_billing_unavailable(
        own_services: Services) -> None:
    pg, redis = own_services.postgres, own_services.redis
    assert isinstance(pg, EmbeddedPostgres) and isinstance(redis, EmbeddedRedis)
    srv = start_server(billing_env(own_services.redis_url, own_services.database_url))
    try:
        admin = Admin(srv.http)
        tenant = admin.create_tenant("outage")
        assert (await asyncio.to_thread(topup, srv.http, tenant, 5000)).status == 201

        await asyncio.to_thread(pg.stop)
        try:
            for method, path, data in admin_calls(tenant):
                reply = await asyncio.to_thread(send, srv.http, method, path, data,
                                                {"Idempotency-Key": "outage-1"})
                assert_error(reply, 503, "billing_unavailable")
                assert reply.headers.get("Retry-After") == "2"
        finally:
            await asyncio.to_thread(pg.start)
        reply = await asyncio.to_thread(send, srv.http, "GET", f"/admin/tenants/{tenant}/balance")
        assert reply.status == 200 and reply.body["balance_micros"] == 5000, reply.raw

        await asyncio.to_thread(redis.stop)
        try:
            reply = await asyncio.to_thread(send, srv.http, "GET",
                                            f"/admin/tenants/{tenant}/balance")
            assert_error(reply, 503, "billing_unavailable")
        finally:
            await asyncio.to_thread(redis.start)
        reply = await asyncio.to_thread(send, srv.http, "GET", f"/admin/tenants/{tenant}/balance")
        assert reply.status == 200, reply.raw
    finally:
        code = srv.stop()
    assert code == 0, "\n".join(srv.stderr_lines[-40:])
    assert_no_request_traceback(srv)
