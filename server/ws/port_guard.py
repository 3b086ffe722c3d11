"""One deployment per port: a second, unrelated `streamgate serve` on the same ports is refused.

The listeners used to set SO_REUSEPORT unconditionally, so a second server started on the same
ports bound them silently and the kernel split connections between two processes with different
admin tokens and keys. Sharing a port is now deliberate: only processes that carry the same
deployment id (`STREAMGATE_DEPLOYMENT_ID`, set by whatever starts the workers of one deployment)
set SO_REUSEPORT and may join each other; everyone else binds exclusively.

Each port is claimed by an abstract Unix socket `@streamgate/port/<port>` (docs/decisions/
0601-port-guard.md): abstract names live in the network namespace, the very scope in which ports
clash; they vanish with the process (no stale lock file after kill -9); and the kernel names
the process that holds one (SO_PEERCRED), so the refusal can say which pid serves the port. The
holder answers each connection with one JSON line carrying its pid and a digest of its
deployment id, which a would-be worker compares with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import socket
import struct
import sys
from dataclasses import dataclass

from server.ws.acceptor import listening_sockets

DEPLOYMENT_ENV = "STREAMGATE_DEPLOYMENT_ID"
# How long a starting server waits for the holder's JSON line (the holder may be busy starting).
OWNER_REPLY_TIMEOUT_S = 2.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class PortInUse(Exception):
    """The port is served by another streamgate (not of our deployment) or another program."""


@dataclass(frozen=True, slots=True)
class PortOwner:
    pid: int
    deployment_digest: str | None  # None: the holder is not part of a named deployment


def deployment_id() -> str | None:
    return os.environ.get(DEPLOYMENT_ENV) or None


def _digest(deployment: str | None) -> str | None:
    # The holder answers anyone on the host: it proves membership without handing out the id.
    return None if deployment is None else hashlib.sha256(deployment.encode()).hexdigest()


def _guard_address(port: int) -> str:
    return f"\0streamgate/port/{port}"


class PortGuard:
    """Holds the claim on one port for as long as the process serves it."""

    def __init__(self, port: int, sock: socket.socket, deployment: str | None) -> None:
        self.port = port
        self._sock = sock
        self._reply = (json.dumps({"pid": os.getpid(), "deployment": _digest(deployment)})
                       + "\n").encode()
        self._loop: asyncio.AbstractEventLoop | None = None

    def serve(self) -> None:
        """Answer who holds the port from the running loop (cheap: one line per question)."""
        self._loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._answer)

    def _answer(self) -> None:
        for _ in range(16):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                conn.setblocking(False)
                conn.send(self._reply)

    def close(self) -> None:
        if self._loop is not None and self._sock.fileno() != -1:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


def _try_claim(port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(_guard_address(port))
        sock.listen(16)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    return sock


def ask_owner(port: int) -> PortOwner | None:
    """Who holds the claim on `port`; None if nobody does (it went away meanwhile)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(OWNER_REPLY_TIMEOUT_S)
    try:
        try:
            sock.connect(_guard_address(port))
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        pid, _, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        digest: str | None = None
        with contextlib.suppress(OSError, ValueError):
            line = sock.makefile("rb").readline(4096)
            reply = json.loads(line)
            digest = reply.get("deployment") if isinstance(reply, dict) else None
        return PortOwner(pid, digest if isinstance(digest, str) else None)
    finally:
        sock.close()


def claim(port: int, deployment: str | None) -> PortGuard | None:
    """Claim `port` for this process. Returns the guard to keep (and serve), or None when the
    port is already held by a process of our own deployment (we join it). Raises PortInUse when
    it is held by anyone else."""
    if not sys.platform.startswith("linux"):
        # No abstract sockets: the exclusive bind alone refuses a second server, unnamed.
        return None
    for _ in range(3):  # the holder may exit between our bind and our question
        sock = _try_claim(port)
        if sock is not None:
            return PortGuard(port, sock, deployment)
        owner = ask_owner(port)
        if owner is None:
            continue
        if deployment is not None and owner.deployment_digest == _digest(deployment):
            return None
        raise PortInUse(f"port {port} is already served by streamgate pid {owner.pid}")
    raise PortInUse(f"port {port}: could not claim it (its holder keeps changing)")


@dataclass(slots=True)
class BoundPort:
    sockets: list[socket.socket]
    guard: PortGuard | None

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.guard is not None:
            self.guard.close()


def bind_port(host: str, port: int, backlog: int,
              deployment: str | None = None, *, listen: bool = True) -> BoundPort:
    """Claim, then bind, `host:port` (port 0: any free port, claimed once known).

    Only members of a named deployment set SO_REUSEPORT: an exclusive bind is what makes a
    second, unrelated server fail instead of sharing the port behind our back."""
    guard = claim(port, deployment) if port else None
    try:
        socks = listening_sockets(host, port, backlog=backlog, reuse_port=deployment is not None,
                                  listen=listen)
    except OSError as exc:
        if guard is not None:
            guard.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} is already in use by another program") from exc
        raise
    bound = BoundPort(socks, guard)
    if not port:
        try:
            bound.guard = claim(bound.port, deployment)
        except BaseException:
            bound.close()
            raise
    return bound
