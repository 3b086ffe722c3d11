"""The one configuration every worker of a node runs with, handed over as a file.

The supervisor loads the configuration once (files, environment, flags), fills in what it made
for the node (the concrete ports, the admin token, the stores' URLs) and writes the result as JSON
into its private runtime directory (0700, the file 0600: it holds the admin token). Workers
decode that file instead of loading the configuration themselves, so a worker restarted an hour
later runs with the same configuration as its siblings even if the TOML file changed meanwhile.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from server.config import Config

if TYPE_CHECKING:
    from server.infra.stores import BillingUrls


def shared_worker_config(cfg: Config, *, ws_port: int, http_port: int, admin_token: str,
                         urls: BillingUrls | None) -> Config:
    server = msgspec.structs.replace(cfg.server, ws_port=ws_port, http_port=http_port,
                                     workers=1)
    billing = cfg.billing
    if billing.enabled:
        billing = msgspec.structs.replace(billing, admin_token=admin_token)
        if urls is not None:
            billing = msgspec.structs.replace(billing, redis_url=urls.redis_url,
                                              database_url=urls.database_url)
    return msgspec.structs.replace(cfg, server=server, billing=billing)


def write_worker_config(cfg: Config, path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(msgspec.json.encode(cfg))


def read_worker_config(path: Path) -> Config:
    return msgspec.json.decode(path.read_bytes(), type=Config)
