"""A real Redis Cluster for the test suite: three masters, no replicas, on free loopback ports.

Each node is a `redis-server --cluster-enabled yes` child process (the EmbeddedRedis lifecycle:
own process group, stopped at interpreter exit at the latest); `redis-cli --cluster create`
assigns the 16384 slots, and the cluster is ready when every node reports `cluster_state:ok`.
One cluster per pytest session (`session_cluster`), shared by every module that asks for it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from server.infra.embedded import (
    REDIS_READY_TIMEOUT,
    EmbeddedRedis,
    MissingBinaryError,
    ServiceStartError,
    find_redis_server,
    free_port,
)

__all__ = ["RedisClusterNode", "TestRedisCluster", "session_cluster"]

CLUSTER_READY_TIMEOUT = 20.0


def _command(port: int, *args: str, timeout: float = 0.5) -> str:
    """One inline command to 127.0.0.1:port and its raw reply ('' when unreachable)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(" ".join(args).encode() + b"\r\n")
            reply = b""
            while True:
                chunk = sock.recv(65536)
                reply += chunk
                if not chunk or _complete(reply):
                    break
    except OSError:
        return ""
    return reply.decode(errors="replace")


def _complete(reply: bytes) -> bool:
    # Simple strings/errors end at the first CRLF; a bulk string announces its length.
    if reply[:1] in (b"+", b"-", b":"):
        return reply.endswith(b"\r\n")
    if reply[:1] == b"$":
        head, sep, body = reply.partition(b"\r\n")
        return bool(sep) and len(body) >= int(head[1:]) + 2
    return False


def find_redis_cli() -> Path:
    found = shutil.which("redis-cli") or next(
        (p for p in ("/usr/bin/redis-cli", "/usr/local/bin/redis-cli") if Path(p).exists()), None
    )
    if found is None:
        raise MissingBinaryError(
            "redis-cli not found: it comes with the Debian package `redis-server` (via"
            " redis-tools); run scripts/setup.sh"
        )
    return Path(found)


class RedisClusterNode(EmbeddedRedis):
    """One cluster-enabled redis-server; its cluster bus on a port of its own (`cluster-port`),
    so a free port near 65535 does not need port + 10000 to exist."""

    _kind = "redis-server (cluster node)"

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, 0)
        self.bus_port = free_port()

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(find_redis_server()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_port),
            "--cluster-config-file", str(self.data_dir / "nodes.conf"),
            "--cluster-node-timeout", "2000",
        ]  # fmt: skip
        self._spawn(argv, self.log_path, cwd=self.data_dir, account=None)
        self._wait_ready(lambda: _command(self.port, "PING").startswith("+PONG"),
                         REDIS_READY_TIMEOUT, self.log_path)


class TestRedisCluster:
    """Three masters on 127.0.0.1; `url` is the `redis+cluster://` URL of the first one."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, root: Path, masters: int = 3) -> None:
        self.nodes = [RedisClusterNode(root / f"node{i}") for i in range(masters)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            create = subprocess.run(
                [str(find_redis_cli()), "--cluster", "create",
                 *(f"127.0.0.1:{port}" for port in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=CLUSTER_READY_TIMEOUT, check=False,
            )
            if create.returncode != 0:
                raise ServiceStartError(f"redis-cli --cluster create failed:\n{create.stdout}"
                                        f"\n{create.stderr}")
            self._wait_ok()
        except BaseException:
            self.stop()
            raise

    def _wait_ok(self) -> None:
        # Every node must agree: a client may be sent to any of them first.
        deadline = time.monotonic() + CLUSTER_READY_TIMEOUT
        while not all("cluster_state:ok" in _command(port, "CLUSTER", "INFO")
                      for port in self.ports):
            if time.monotonic() > deadline:
                states = {p: _command(p, "CLUSTER", "INFO")[:200] for p in self.ports}
                raise ServiceStartError(f"Redis Cluster not ok after "
                                        f"{CLUSTER_READY_TIMEOUT:.0f} s: {states}")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def session_cluster(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> TestRedisCluster:
    """The pytest session's one Redis Cluster, started on first use and stopped when the
    session ends (whichever fixture asks first: billing, billing_redis and e2e share it)."""
    key = _CLUSTER_KEY
    cluster = request.config.stash.get(key, None)
    if cluster is None:
        cluster = TestRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
        cluster.start()
        request.config.stash[key] = cluster
        request.config.add_cleanup(cluster.stop)
    return cluster


_CLUSTER_KEY = pytest.StashKey[TestRedisCluster]()
