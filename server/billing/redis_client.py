"""The Redis client billing talks to: one server, or a Redis Cluster (docs/decisions/13B1).

The URL says which: `redis://` / `rediss://` (and `unix://`) is one server, `redis+cluster://`
/ `rediss+cluster://` a cluster, reached through any of its nodes (several seed nodes may be
given, comma-separated: `redis+cluster://10.0.0.1:7000,10.0.0.2:7000`); the client discovers
the rest with CLUSTER SLOTS and follows MOVED/ASK redirections.

Billing code uses only what both clients do the same way: EVALSHA/SCRIPT LOAD, single-key
commands, and WATCH/MULTI on keys of one tenant (one hash tag, so one slot: keys.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    RedisClusterException,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError


class ClusterClient(RedisCluster):
    """RedisCluster that reports an unreachable cluster as redis' ConnectionError, like the
    one-server client does: with no node answering, redis-py raises RedisClusterUnreachableError
    (no RedisError at all), which every `except RedisError` (503 billing_unavailable, the
    sweeper, rate limits failing open, usage reports deferred) would let through as a crash.
    Commands, and pipelines (`pipeline()`: the batched billing scripts, WATCH/MULTI), alike."""

    async def initialize(self, *args: Any, **kwargs: Any) -> ClusterClient:
        try:
            await super().initialize(*args, **kwargs)
        except _UNREACHABLE as exc:
            raise _unreachable(exc) from exc
        return self

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except _UNREACHABLE as exc:
            raise _unreachable(exc) from exc

    def pipeline(self, transaction: Any | None = None,
                 shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:  # as RedisCluster.pipeline
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # redis-py declares an attribute ClusterPipeline never sets as abstract
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


class _ClusterPipeline(ClusterPipeline):
    """A pipeline of ClusterClient: redis-py's pipeline and transaction strategies give up on a
    cluster no node answers with RedisClusterUnreachableError of their own (after their own
    topology refresh), never passing through `ClusterClient.execute_command`; converted here
    wherever a pipeline does I/O: `execute`, WATCH/UNWATCH, and the commands a transaction
    runs at once while watching."""

    async def execute(self, raise_on_error: bool = True,
                      allow_redirections: bool = True) -> list[Any]:
        replies: list[Any] = await _converted(super().execute(raise_on_error,
                                                              allow_redirections))
        return replies

    async def watch(self, *names: Any) -> None:  # type: ignore[override]
        await _converted(super().watch(*names))  # type: ignore[no-untyped-call]

    async def unwatch(self) -> None:  # type: ignore[override]
        await _converted(super().unwatch())  # type: ignore[no-untyped-call]

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        staged = super().execute_command(*args, **kwargs)
        if staged is self or not inspect.isawaitable(staged):
            return staged  # queued: nothing sent yet
        return _converted(staged)  # a command a watching transaction runs at once


async def _converted(reply: Awaitable[Any]) -> Any:
    try:
        return await reply
    except _UNREACHABLE as exc:
        raise _unreachable(exc) from exc


def _unreachable(exc: Exception) -> RedisConnectionError:
    return RedisConnectionError(f"Redis Cluster unreachable: {exc}")


_UNREACHABLE = (RedisClusterUnreachableError, SlotNotCoveredError)

# Either client; redis-py gives both the same command methods.
BillingRedis = aioredis.Redis | RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

_MAX_CONNECTIONS = 1024  # per process (one server) or per process and node (cluster)
_SOCKET_TIMEOUT_S = 2.0
_CONNECT_TIMEOUT_S = 1.0


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in CLUSTER_SCHEMES


def _retry() -> Retry:
    # Few, short retries: every money script is idempotent (wallet_cache.py; the rate limiter's
    # audio.lua is not, so a retry can count audio seconds twice against a limit, never money:
    # script_batch.py), and a Redis outage must turn into a quick, clear decision, not seconds
    # of backoff per call.
    return Retry(ExponentialBackoff(cap=0.2, base=0.02), 2)


def cluster_seed_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster URL as a plain one-node URL (credentials, TLS and options kept) and every seed
    node it names. Refuses a database other than 0: a cluster has only database 0."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"not a Redis Cluster URL (redis+cluster://host:port): {url!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = port, "6379"
        host = host.strip("[]")  # an IPv6 literal
        if not host or not port.isdigit():
            raise ValueError(f"bad node {item!r} in Redis Cluster URL")
        nodes.append((host, int(port)))
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0; drop the /<db> from the URL")
    first = f"{nodes[0][0]}:{nodes[0][1]}" if ":" not in nodes[0][0] else \
        f"[{nodes[0][0]}]:{nodes[0][1]}"
    netloc = f"{userinfo}@{first}" if userinfo else first
    plain = urlunsplit(SplitResult(scheme, netloc, "", parts.query, ""))
    return plain, nodes


def connect(url: str, *, max_connections: int = _MAX_CONNECTIONS) -> BillingRedis:
    """A client for `url` (no I/O yet: a cluster client maps the slots on first use).

    One server: a pool that waits instead of failing. It is sized for a process's sessions
    (~1000 per core), not for Redis: with the event loop saturated a call holds its connection
    until the loop gets round to the reply, and 256 connections ran out under `make bench`.
    Connections are opened on demand, so an idle server holds a few."""
    if is_cluster_url(url):
        plain, nodes = cluster_seed_nodes(url)
        options = {
            "max_connections": max_connections,
            "socket_timeout": _SOCKET_TIMEOUT_S,
            "socket_connect_timeout": _CONNECT_TIMEOUT_S,
            "retry": _retry(),
        }
        client = ClusterClient.from_url(plain, **options)
        if len(nodes) == 1:
            return client
        # More seed nodes: they need the first one's connection options (credentials, TLS),
        # which redis-py works out from the URL; a client that never connected holds nothing.
        seeds = [ClusterNode(host, port, **client.connection_kwargs) for host, port in nodes[1:]]
        return ClusterClient.from_url(plain, startup_nodes=seeds, **options)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=2.0, socket_timeout=_SOCKET_TIMEOUT_S,
        socket_connect_timeout=_CONNECT_TIMEOUT_S,
    )
    return aioredis.Redis(
        connection_pool=pool,
        retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
