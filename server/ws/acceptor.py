"""Accepting connections in batches, because uvloop accepts one per loop iteration.

libuv (uvloop's core) accepts a single connection per readiness event since 1.45
(libuv/libuv#3696). When the loop is busy serving sessions, an iteration takes tens of ms, so
upgrades are admitted at the loop's iteration rate: ~30 per second at 30 ms. During a 200/s
ramp to 1000 real-time sessions the listen queue held ~370 connections and some clients waited
more than 20 s for their 101. Here one readiness event accepts up to `batch` connections, so
admission keeps pace with arrivals; the bound keeps a connection storm from starving the
sessions already running for a whole iteration.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("streamgate.ws")

ACCEPT_BATCH = 128
# Out of descriptors or kernel memory: accepting again at once would spin; pause, as asyncio does.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RESOURCE_PAUSE_S = 1.0


def listening_sockets(host: str, port: int, backlog: int, reuse_port: bool,
                      listen: bool = True) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address `host` resolves to (what
    loop.create_server would bind); port 0 becomes one free port for all of them. Without
    `listen` they are only bound (a supervisor's hold on a port: never in the kernel's
    SO_REUSEPORT group, so no connection is ever queued on them)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and socks[0] is not sock:
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])  # one port for all
            sock.bind(addr)
            if listen:
                sock.listen(backlog)
                sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class BatchAcceptor:
    """Accepts on one listening socket and hands the connections to the loop's transports."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        spawn: Callable[[Coroutine[Any, Any, Any]], object],
        batch: int = ACCEPT_BATCH,
    ) -> None:
        self.sock = sock
        self._factory = protocol_factory
        self._spawn = spawn
        self._batch = batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused: asyncio.TimerHandle | None = None
        self.accepted = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if self._loop is not None and self.sock.fileno() != -1:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _on_readable(self) -> None:
        accepted: list[socket.socket] = []
        for _ in range(self._batch):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue  # the peer gave up while queued
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._pause(exc)
                    break
                raise
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            accepted.append(conn)
        if accepted:
            self.accepted += len(accepted)
            self._spawn(self._attach(accepted))

    async def _attach(self, socks: list[socket.socket]) -> None:
        """Transports for all of them at once: awaited one by one, each would take its own loop
        iteration again."""
        assert self._loop is not None
        loop = self._loop
        results = await asyncio.gather(
            *(loop.connect_accepted_socket(self._factory, s) for s in socks),
            return_exceptions=True,
        )
        for sock, result in zip(socks, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("accepted connection dropped: %s", result)
                sock.close()

    def _pause(self, exc: OSError) -> None:
        assert self._loop is not None
        log.error("accept paused for %.0f s: %s", RESOURCE_PAUSE_S, exc)
        self._loop.remove_reader(self.sock.fileno())
        self._paused = self._loop.call_later(RESOURCE_PAUSE_S, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self._loop is not None and self.sock.fileno() != -1:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
