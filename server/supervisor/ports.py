"""The supervisor's hold on both ports while its workers come and go.

For each port the supervisor claims the port guard (server/ws/port_guard.py) under the node's
deployment id and binds, without listening, a SO_REUSEPORT socket on every address the workers
will listen on. The claim is what makes an unrelated `streamgate serve` fail by name while the
workers (same deployment id) join; the bound socket keeps other programs off the port even when
every worker is down, and turns port 0 into the concrete port all workers share. A socket that
never listens is not in the kernel's SO_REUSEPORT group: no connection is ever queued on it.
"""

from __future__ import annotations

from server.ws.port_guard import BoundPort, bind_port

# What the supervisor holds: the port guard's claim and the bound (not listening) sockets.
ReservedPort = BoundPort


def reserve_port(host: str, port: int, deployment: str) -> ReservedPort:
    """Claim and bind `host:port` for `deployment` (port 0: a free port, claimed once known).
    Raises PortInUse, as a server would, when someone else serves or holds the port."""
    return bind_port(host, port, backlog=0, deployment=deployment, listen=False)
