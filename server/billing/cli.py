"""`streamgate` billing subcommands: migrate, flusher, reconcile, tenant, key, topup, balance,
usage. They talk to Postgres (and Redis, for top-ups and reconcile) directly, at the URLs the
server would use: config, then REDIS_URL/DATABASE_URL, then the embedded servers. Finding them
(`locate`) is handed in by the command line's root (server/__main__.py): billing does not start
the development servers itself."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.billing.bootstrap import prepare_database
from server.billing.flusher import flusher_main
from server.billing.reconcile import reconcile_main
from server.billing.service import BillingService
from server.billing.store import MAX_MICROS, BillingError
from server.billing.wallet_cache import WalletCache
from server.config import Config, ConfigError, load_config

# A database that cannot be reached: one line on stderr, exit 1, no traceback.
_UNREACHABLE = (OSError, TimeoutError, asyncpg.PostgresConnectionError,
                asyncpg.exceptions.OperatorInterventionError, RedisConnectionError,
                RedisTimeoutError)


class StoreUrls(Protocol):
    @property
    def redis_url(self) -> str: ...

    @property
    def database_url(self) -> str: ...


# Where Redis and PostgreSQL are for this config (starting the embedded ones if need be).
Locate = Callable[[Config], Awaitable[StoreUrls]]


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


async def _with_service(cfg: Config, locate: Locate,
                        fn: Callable[[BillingService], Awaitable[int]]) -> int:
    urls = await locate(cfg)
    await prepare_database(cfg, urls.database_url)
    service = BillingService(cfg.billing, report_interval_s=cfg.asr.session.usage_interval_s)
    await service.start(urls.redis_url, urls.database_url, background=False)
    try:
        return await fn(service)
    finally:
        await service.stop()


async def _run(args: argparse.Namespace, cfg: Config, locate: Locate) -> int:
    cmd = args.billing_command
    if cmd == "migrate":
        urls = await locate(cfg)
        await prepare_database(cfg, urls.database_url)
        print("database migrated")
        return 0
    if cmd == "flusher":
        urls = await locate(cfg)
        def make_refund(redis: Any) -> Callable[[str, str, int], Awaitable[None]]:
            cache = WalletCache(redis)

            async def refund(tenant_id: str, event_id: str, cost: int) -> None:
                await cache.refund(tenant_id, event_id, cost)

            return refund

        return await flusher_main(urls.redis_url, urls.database_url, make_refund=make_refund,
                                  until_empty=args.until_empty,
                                  claim_idle_ms=round(cfg.billing.flush_claim_idle_s * 1000))
    if cmd == "reconcile":
        urls = await locate(cfg)
        return await reconcile_main(urls.redis_url, urls.database_url)

    async def act(svc: BillingService) -> int:
        store = svc.store
        assert store is not None
        if cmd == "tenant-create":
            tenant = await store.create_tenant(args.tenant_id, args.name,
                                               overdraft_micros=args.overdraft_micros)
            _print({"tenant_id": tenant.tenant_id, "name": tenant.name})
        elif cmd == "key-issue":
            issued = await store.issue_key(args.tenant_id)
            _print({"key_id": issued.key_id, "prefix": issued.prefix, "api_key": issued.key,
                    "note": "shown once; only its SHA-256 is stored"})
        elif cmd == "key-revoke":
            if not await store.revoke_key(args.key_id):
                print(f"no such key: {args.key_id}", file=sys.stderr)
                return 1
            _print({"key_id": args.key_id, "revoked": True})
        elif cmd == "topup":
            res = await svc.topup(args.tenant_id, args.amount_micros, args.idempotency_key)
            _print({"topup_id": res.topup_id, "amount_micros": res.amount_micros,
                    "created": res.created})
        elif cmd == "balance":
            assert svc.cache is not None
            _print({"tenant_id": args.tenant_id,
                    "balance_micros": await store.balance(args.tenant_id),
                    "spendable_micros": await svc.cache.spendable(args.tenant_id)})
        elif cmd == "usage":
            rows = await store.usage_summary(args.tenant_id, args.since, args.until)
            _print([{"day": r.day, "model": r.model, "unit": r.unit, "units": r.units,
                     "cost_micros": r.cost_micros} for r in rows])
        return 0

    try:
        return await _with_service(cfg, locate, act)
    except (BillingError, ValueError, TypeError) as exc:
        # BillingError: "no such tenant: x", a reused idempotency key; ValueError: a bound.
        print(f"streamgate: {exc}", file=sys.stderr)
        return 1
    except _UNREACHABLE as exc:
        print(f"streamgate: billing database unreachable: {exc}", file=sys.stderr)
        return 1


def main(args: argparse.Namespace, *, locate: Locate) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"streamgate: {exc}", file=sys.stderr)
        return 2
    return uvloop.run(_run(args, cfg, locate))


def _day(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date: use YYYY-MM-DD") from None


def add_subcommands(sub: Any, locate: Locate) -> None:
    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", type=Path, help="TOML file layered over config/default.toml")
        p.set_defaults(func=functools.partial(main, locate=locate), billing_command=name)
        return p

    tenant_help = "tenant id (e.g. dev, the tenant `./scripts/run.sh` creates)"
    command("migrate", "apply database migrations and default price plans")
    p = command("flusher", "run the usage flusher alone (Redis stream -> Postgres)")
    p.add_argument("--until-empty", action="store_true",
                   help="exit once every usage stream is flushed (0), or 1 with entries left "
                   "after the claim delay; before moving to another Redis (docs/billing.md)")
    command("reconcile", "check the billing invariants; exit 1 if any is broken")
    p = command("tenant-create", "create a tenant (and its empty wallet); prints its id")
    p.add_argument("name", help="display name")
    p.add_argument("--tenant-id", help="id to use: 1-64 of A-Z a-z 0-9 _ . : - "
                   "(default: a random t_<hex>)")
    p.add_argument("--overdraft-micros", type=int, default=0,
                   help=f"how far below zero the wallet may go, 0..{MAX_MICROS} (default 0)")
    p = command("key-issue", "issue an API key for a tenant (printed once)")
    p.add_argument("tenant_id", help=tenant_help)
    p = command("key-revoke", "revoke an API key")
    p.add_argument("key_id", help="the key's id (k_...), as key-issue printed it")
    p = command("topup", "add money to a tenant's wallet (idempotent by key)")
    p.add_argument("tenant_id", help=tenant_help)
    p.add_argument("amount_micros", type=int,
                   help=f"amount in micros (1,000,000 = 1 currency unit), 1..{MAX_MICROS}")
    p.add_argument("--idempotency-key", required=True,
                   help="unique per payment: a retry with the same key credits once")
    p = command("balance", "a tenant's balance (Postgres) and spendable (Redis cache; null "
                "until the tenant's first session loads the wallet)")
    p.add_argument("tenant_id", help=tenant_help)
    p = command("usage", "a tenant's usage by UTC day, model and unit")
    p.add_argument("tenant_id", help=tenant_help)
    p.add_argument("--since", type=_day, metavar="YYYY-MM-DD",
                   help="first UTC day to include (default: no lower limit)")
    p.add_argument("--until", type=_day, metavar="YYYY-MM-DD",
                   help="last UTC day to include (default: no upper limit)")

