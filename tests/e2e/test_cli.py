"""`streamgate` billing commands as a user runs them: a real process against the suite's real
PostgreSQL and Redis (issue 11, item 17)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from server.billing.store import MAX_MICROS
from tests.e2e.conftest import ROOT
from tests.e2e.test_billing_e2e import cleanup_redis, with_redis_db

pytestmark = pytest.mark.e2e
CLI_REDIS_DB = 8  # no server runs on it: only these tests' unique tenants


def streamgate(redis_url: str, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGATE_")}
    env.update({"STREAMGATE_BILLING__REDIS_URL": redis_url,
                "STREAMGATE_BILLING__DATABASE_URL": dsn})
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv", [
    ["balance", "nosuch"],
    ["topup", "nosuch", "1000", "--idempotency-key", "k1"],
    ["key-issue", "nosuch"],
    ["usage", "nosuch"],
    ["usage", "nosuch", "--since", "2026-01-01"],
])
def test_unknown_tenant_says_so_and_exits_1(redis_url: str, fresh_database: str,
                                            argv: list[str]) -> None:
    done = streamgate(with_redis_db(redis_url, CLI_REDIS_DB), fresh_database, *argv)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == "streamgate: no such tenant: nosuch"
    assert "Traceback" not in done.stderr


async def test_tenant_topup_balance_usage_and_bounds(redis_url: str,
                                                     fresh_database: str) -> None:
    rurl = with_redis_db(redis_url, CLI_REDIS_DB)
    tenant = f"cli-{uuid.uuid4().hex[:12]}"
    try:
        created = streamgate(rurl, fresh_database, "tenant-create", "CLI test",
                             "--tenant-id", tenant)
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["tenant_id"] == tenant

        done = streamgate(rurl, fresh_database, "topup", tenant, "2500000",
                          "--idempotency-key", "order-1")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["created"] is True

        # No session yet: the Redis wallet is not loaded, spendable is null (README explains).
        balance = streamgate(rurl, fresh_database, "balance", tenant)
        assert balance.returncode == 0, balance.stderr
        assert json.loads(balance.stdout) == {"tenant_id": tenant, "balance_micros": 2_500_000,
                                              "spendable_micros": None}

        usage = streamgate(rurl, fresh_database, "usage", tenant)
        assert usage.returncode == 0 and json.loads(usage.stdout) == [], usage.stderr

        too_much = streamgate(rurl, fresh_database, "topup", tenant, str(MAX_MICROS + 1),
                              "--idempotency-key", "order-2")
        assert too_much.returncode == 1 and "amount_micros" in too_much.stderr, too_much.stderr
        assert "Traceback" not in too_much.stderr
        bad_id = streamgate(rurl, fresh_database, "tenant-create", "x", "--tenant-id", "a b")
        assert bad_id.returncode == 1 and "tenant id" in bad_id.stderr, bad_id.stderr
        assert "Traceback" not in bad_id.stderr
    finally:
        await cleanup_redis(rurl, [tenant], [])
