"""The supervisor's hold on both ports while its workers come and go.

For each port the supervisor claims the port guard (server/ws/port_guard.py) under the node's
deployment id and binds, without listening, a SO_REUSEPORT socket on every address the workers
will listen on. The claim is what makes an unrelated `streamgate serve` fail by name while the
workers (same deployment id) join; the bound socket keeps other programs off the port even when
every worker is down, and turns port 0 into the concrete port all workers share. A socket that
never listens is not in the kernel's SO_REUSEPORT group: no connection is ever queued on it.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any

from server.ws.port_guard import PortGuard, PortInUse, claim


@dataclass(slots=True)
class ReservedPort:
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


def _bound_sockets(host: str, port: int) -> list[socket.socket]:
    """What server/ws/acceptor.listening_sockets binds, minus listen(): one socket per address."""
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
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and socks[0] is not sock:
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])  # one port for all
            sock.bind(addr)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def reserve_port(host: str, port: int, deployment: str) -> ReservedPort:
    """Claim and bind `host:port` for `deployment` (port 0: a free port, claimed once known).
    Raises PortInUse, as a server would, when someone else serves or holds the port."""
    guard = claim(port, deployment) if port else None
    try:
        socks = _bound_sockets(host, port)
    except OSError as exc:
        if guard is not None:
            guard.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} is already in use by another program") from exc
        raise
    reserved = ReservedPort(socks, guard)
    if not port:
        try:
            reserved.guard = claim(reserved.port, deployment)
        except BaseException:
            reserved.close()
            raise
    return reserved
