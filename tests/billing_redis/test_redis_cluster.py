"""Redis Cluster rules for the billing scripts (docs/decisions/13B1): every script's KEYS hash
to one slot, and no script names a key it was not given in KEYS; and the cluster client billing
builds from a `redis+cluster://` URL."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from server.billing import keys
from server.billing.redis_client import cluster_seed_nodes, connect, is_cluster_url
from server.billing.wallet_cache import WalletCache

LUA_DIR = Path(keys.__file__).with_name("lua")
TENANTS = ["t-1", "acme", "tenant:with:colons", "ünïcode", "x" * 200, "t-2b9c"]
LEASES = ["s1", "sess-0f3a:req", "l" * 64]

# The KEYS each script is called with (WalletCache, RateLimiter), per tenant and lease. A new
# script in lua/ fails test_every_script_is_listed until it is added here.
SCRIPT_KEYS: dict[str, Callable[[str, str], list[str]]] = {
    "seed": lambda t, _: keys.wallet_ids_keys(t, keys.topups_key(t)),
    "topup": lambda t, _: keys.wallet_ids_keys(t, keys.topups_key(t)),
    "refund": lambda t, _: keys.wallet_ids_keys(t, keys.refunds_key(t)),
    "reserve": keys.reserve_keys,
    "report": keys.lease_script_keys,
    "replay": keys.lease_script_keys,
    "settle": keys.lease_script_keys,
    "expired": lambda t, _: [keys.leases_key(t)],
    "sweep": lambda t, lease: keys.sweep_keys(t, [lease, lease + "-b", "other"]),
    "sessions": lambda t, _: [keys.sessions_key(t)],
    "audio": lambda t, _: [keys.audio_key(t)],
    "gcra": lambda key_id, _: [keys.gcra_key(key_id)],  # per API key id, not per tenant
}


def test_every_script_is_listed() -> None:
    scripts = {p.stem for p in LUA_DIR.glob("*.lua") if not p.stem.startswith("_")}
    assert scripts == set(SCRIPT_KEYS)


@pytest.mark.parametrize("script", sorted(SCRIPT_KEYS))
def test_each_scripts_keys_share_one_slot(script: str) -> None:
    slots_seen = set()
    for tenant in TENANTS:
        for lease in LEASES:
            names = SCRIPT_KEYS[script](tenant, lease)
            slots = {key_slot(k.encode()) for k in names}
            assert len(slots) == 1, (script, tenant, lease, names)
            slots_seen |= slots
    # One slot per tenant, not one for everybody: tenants spread over the cluster.
    assert len(slots_seen) > 1


def test_no_script_names_a_key_of_its_own() -> None:
    """Keys reach redis.call only from KEYS (or a _common.lua parameter fed from KEYS): no key
    literal and no key built by concatenation inside a script."""
    for path in LUA_DIR.glob("*.lua"):
        text = path.read_text()
        assert not re.search(r"""['"]sg:""", text), path.name
        for call in re.finditer(r"redis\.call\('(\w+)',\s*([^,)]+)", text):
            command, first = call.group(1).upper(), call.group(2).strip()
            if command == "TIME":
                continue
            assert first.startswith("KEYS[") or re.fullmatch(r"[a-z_]+", first), (
                path.name, call.group(0))
            assert ".." not in first, (path.name, call.group(0))


async def test_slots_agree_with_the_cluster(redis_cluster_url: str) -> None:
    """redis-py's key_slot is what the servers compute (CLUSTER KEYSLOT), on a real cluster."""
    r = connect(redis_cluster_url)
    assert isinstance(r, RedisCluster)
    try:
        for tenant in TENANTS[:3]:
            names = [*keys.lease_script_keys(tenant, "s1"), keys.sessions_key(tenant)]
            served = {int(await r.cluster_keyslot(k)) for k in names}
            assert served == {key_slot(names[0].encode())}
    finally:
        await r.aclose()


def test_cluster_urls() -> None:
    assert is_cluster_url("redis+cluster://h:7000") and is_cluster_url("rediss+cluster://h:1")
    assert not is_cluster_url("redis://h:6379/0")
    plain, nodes = cluster_seed_nodes("rediss+cluster://u:p@a:7000,b:7001,[::1]:7002/0?x=1")
    assert plain == "rediss://u:p@a:7000?x=1"
    assert nodes == [("a", 7000), ("b", 7001), ("::1", 7002)]
    assert cluster_seed_nodes("redis+cluster://a")[1] == [("a", 6379)]
    with pytest.raises(ValueError, match="database 0"):
        cluster_seed_nodes("redis+cluster://a:7000/3")
    with pytest.raises(ValueError, match="bad node"):
        cluster_seed_nodes("redis+cluster://a:x")


async def test_a_dead_seed_node_is_skipped(redis_cluster_url: str) -> None:
    url = redis_cluster_url.replace("redis+cluster://", "redis+cluster://127.0.0.1:1,")
    r = connect(url)
    try:
        await r.set("sg:{seed-test}:x", "1")
        assert await r.get("sg:{seed-test}:x") == b"1"
        await r.delete("sg:{seed-test}:x")
    finally:
        await r.aclose()


async def test_an_unreachable_cluster_is_a_connection_error() -> None:
    """As with one server: callers' `except RedisError` (503 billing_unavailable, rate limits
    failing open) must see it, not redis-py's RedisClusterUnreachableError."""
    r = connect("redis+cluster://127.0.0.1:1")
    try:
        with pytest.raises(RedisConnectionError, match="unreachable"):
            await r.get("x")
    finally:
        await r.aclose()


async def test_scan_reaches_every_master(redis_cluster_url: str) -> None:
    """Key sweeps by SCAN (test and admin clean-up by keys.tenant_pattern) must walk every
    master: a tenant's keys live on whichever master owns its slot. (The lease sweeper needs no
    SCAN: it walks `sg:tenants` and runs EXPIRED/SWEEP in each tenant's own slot.)"""
    r = connect(redis_cluster_url)
    assert isinstance(r, RedisCluster)
    run = uuid.uuid4().hex[:8]
    tenants = [f"scan-{run}-{i}" for i in range(12)]
    wc = WalletCache(r)
    try:
        for t in tenants:
            await wc.seed(t, 1_000, 0)
        owners = {str(r.get_node_from_key(keys.wallet_key(t))) for t in tenants}
        assert len(owners) >= 2, owners  # 12 tenants over 3 masters: never all on one
        found = {k.decode() async for k in r.scan_iter(match=f"sg:{{scan-{run}-*", count=1000)}
        assert {keys.wallet_key(t) for t in tenants} <= found
        for t in tenants[:3]:
            assert [k async for k in r.scan_iter(match=keys.tenant_pattern(t))] != []
    finally:
        for t in tenants:
            await r.delete(keys.wallet_key(t), keys.topups_key(t))
            await r.srem(keys.TENANTS_SET, t)
        await r.aclose()
