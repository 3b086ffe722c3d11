"""Redis key names for billing and rate limits, in one place (docs/billing.md, "Redis").

Every key of a tenant carries the hash tag `{t}` so that all keys one Lua script touches live in
one Redis Cluster slot. The wallet cache, the flusher, the sweeper and reconcile must all build
names here rather than by hand, or they would silently read different keys.
"""

from __future__ import annotations

TENANTS_SET = "sg:tenants"  # tenants with a wallet cache; no hash tag, never touched by a script
FLUSHER_GROUP = "flusher"  # consumer group on every usage stream

# The scripts in lua/ hard-code these two (86400000, 172800000); change both together.
TOMBSTONE_TTL_MS = 24 * 3600 * 1000  # a retried SETTLE / late REPORT arrives well within a day
IDS_TTL_MS = 48 * 3600 * 1000  # top-up and refund id sets; SEED includes the last 48 h of top-ups


def _check_tag(part: str) -> str:
    # A brace inside the tag would end it early and move the key to another slot.
    if not part or "{" in part or "}" in part:
        raise ValueError(f"invalid id for a Redis key: {part!r}")
    return part


def wallet_key(tenant: str) -> str:
    return f"sg:{{{_check_tag(tenant)}}}:wallet"


def lease_key(tenant: str, lease_id: str) -> str:
    return f"sg:{{{_check_tag(tenant)}}}:lease:{_check_tag(lease_id)}"


def leases_key(tenant: str) -> str:
    return f"sg:{{{_check_tag(tenant)}}}:leases"


def settled_key(tenant: str, lease_id: str) -> str:
    return f"sg:{{{_check_tag(tenant)}}}:settled:{_check_tag(lease_id)}"


def usage_stream(tenant: str) -> str:
    return f"sg:{{{_check_tag(tenant)}}}:usage"


def topups_key(tenant: str) -> str:
    return f"sg:{{{_check_tag(tenant)}}}:topups"


def refunds_key(tenant: str) -> str:
    return f"sg:{{{_check_tag(tenant)}}}:refunds"


def sessions_key(tenant: str) -> str:
    return f"sg:{{{_check_tag(tenant)}}}:sessions"


def audio_key(tenant: str) -> str:
    return f"sg:{{{_check_tag(tenant)}}}:audio"


def gcra_key(key_id: str) -> str:
    # Per API key, not per tenant: its own hash tag so keys spread over the cluster.
    return f"sg:{{key:{_check_tag(key_id)}}}:gcra"


# --- KEYS of each script (lua/<name>.lua), in the order the script reads them ------------------
# Redis Cluster runs a script only if every key it touches is in KEYS and all of them are in one
# slot; these lists are what WalletCache and RateLimiter pass, and tests check their slots.


def wallet_ids_keys(tenant: str, ids_key: str) -> list[str]:
    """SEED, TOPUP (ids_key = topups_key) and REFUND (ids_key = refunds_key)."""
    return [wallet_key(tenant), ids_key]


def reserve_keys(tenant: str, lease_id: str) -> list[str]:
    return [wallet_key(tenant), lease_key(tenant, lease_id), leases_key(tenant),
            settled_key(tenant, lease_id)]


def lease_script_keys(tenant: str, lease_id: str) -> list[str]:
    """REPORT, REPLAY and SETTLE."""
    return [*reserve_keys(tenant, lease_id), usage_stream(tenant)]


def sweep_keys(tenant: str, lease_ids: list[str]) -> list[str]:
    """SWEEP: the wallet, the leases zset, then (lease, tombstone) per lease id."""
    out = [wallet_key(tenant), leases_key(tenant)]
    for lease_id in lease_ids:
        out += [lease_key(tenant, lease_id), settled_key(tenant, lease_id)]
    return out


def tenant_pattern(tenant: str) -> str:
    """SCAN pattern for every key of one tenant (tests, admin tooling); braces escaped for glob."""
    return f"sg:\\{{{_check_tag(tenant)}\\}}:*"
