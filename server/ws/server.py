"""The WebSocket listener: connections, routing at the upgrade, housekeeping and drain.

One housekeeping tick walks every connection (idle timeout, ping/pong, close deadlines) instead
of a timer per connection: a timer per session per second costs more than the sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from websockets.http11 import Request

from server import native
from server.config import ServerConfig
from server.flow_control.finals import FINALS_TIMEOUT_S
from server.protocol.admission import AdmissionPolicy, Authenticator, Principal
from server.protocol.errors import Rejected, refuse
from server.sessions.upgrade import Admitted, UpgradeRequest
from server.telemetry import tracing
from server.telemetry.metrics import Metrics
from server.telemetry.tracing import TRACING
from server.ws.acceptor import BatchAcceptor
from server.ws.connection import WsConnection
from server.ws.handshake import BadUpgrade, parse_upgrade
from server.ws.port_guard import BoundPort, bind_port, deployment_id

log = logging.getLogger("streamgate.ws")

# A session told to drain has this long to deliver the finals it owes (FINALS_TIMEOUT_S), settle
# and close before the listener cuts it.
DRAIN_FINISH_S: Final = FINALS_TIMEOUT_S + 5.0


class Endpoint(Protocol):
    """A session kind behind one path (ASR, TTS, telephony)."""

    kind: str

    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        ...


class InBandEndpoint(Endpoint, Protocol):
    """An endpoint whose key may come after the upgrade, inside the session (telephony
    providers cannot set headers: the key is in the `start` event)."""

    async def admit_without_key(self, upgrade: UpgradeRequest) -> Admitted | Rejected: ...


class AuthMode(enum.Enum):
    KEY_AT_UPGRADE = "key_at_upgrade"  # no valid key at the upgrade: 401
    KEY_AT_UPGRADE_OR_IN_BAND = "key_at_upgrade_or_in_band"  # no key: the endpoint checks later


@dataclass(frozen=True, slots=True)
class Route:
    endpoint: Endpoint
    in_band: InBandEndpoint | None = None  # set when the auth mode allows the key in-band

    @property
    def auth(self) -> AuthMode:
        return AuthMode.KEY_AT_UPGRADE if self.in_band is None else (
            AuthMode.KEY_AT_UPGRADE_OR_IN_BAND)


class Router:
    def __init__(self, server: WsServer, authenticator: Authenticator) -> None:
        self._server = server
        self._auth = authenticator
        self.policy: AdmissionPolicy | None = None
        self.routes: dict[str, Route] = {}

    def add(self, path: str, endpoint: Endpoint) -> None:
        """`endpoint` at `path`; the key must come with the upgrade."""
        self.routes[path] = Route(endpoint)

    def add_in_band(self, path: str, endpoint: InBandEndpoint) -> None:
        """`endpoint` at `path`; without a key at the upgrade, the endpoint admits the socket
        and authenticates the key that comes in-band (docs/protocol.md, "Authentication and
        admission")."""
        self.routes[path] = Route(endpoint, endpoint)

    async def admit(self, request: Request, conn: WsConnection) -> Admitted | Rejected:
        if TRACING.on:
            decision = await self._decide_traced(request, conn)
        else:
            decision = await self._decide(request, conn)
        if isinstance(decision, Rejected):
            self._server.metrics.upgrades_rejected.labels(str(decision.status)).inc()
            log.info(
                "upgrade rejected",
                extra={"path": conn.path.split("?")[0], "status": decision.status,
                       "code": decision.code, "peer": conn.peer},
            )
        return decision

    async def _decide_traced(self, request: Request,
                             conn: WsConnection) -> Admitted | Rejected:
        """`_decide` under a `ws.upgrade` span (the client's `traceparent` its parent). The span
        stays current in the connection's admission task, so the session its `start` opens
        right after the 101 is its child."""
        headers = request.headers
        parent = tracing.parent_from_values(headers.get_all("traceparent"),
                                            headers.get_all("tracestate"))
        span = tracing.start_span(
            "ws.upgrade", parent=parent,
            kind=tracing.SpanKind.SERVER,
            attributes={"url.path": conn.path.split("?")[0], "client.address": conn.peer})
        tracing.activate(span)
        try:
            decision = await self._decide(request, conn)
        except BaseException as exc:
            tracing.error(span, type(exc).__name__)
            span.end()
            raise
        if isinstance(decision, Rejected):
            span.set_attributes({"http.response.status_code": decision.status,
                                 "streamgate.refusal": decision.code})
            if decision.status >= 500:
                tracing.error(span, decision.code)
        else:
            span.set_attribute("http.response.status_code", 101)
        span.end()
        return decision

    async def _decide(self, request: Request, conn: WsConnection) -> Admitted | Rejected:
        server = self._server
        if server.draining:
            return refuse("draining", "server is draining; reconnect elsewhere")
        try:
            upgrade = parse_upgrade(request)
        except BadUpgrade as exc:
            return refuse("bad_request", str(exc))
        route = self.routes.get(upgrade.path)
        if route is None:
            return refuse("not_found", f"no WebSocket endpoint at {upgrade.path[:64]}")
        conn.kind = route.endpoint.kind  # its drain timeout is its kind's
        if server.session_count >= server.config.max_connections:
            return refuse("overloaded", "too many sessions on this node")
        if upgrade.api_key is None and route.in_band is not None:
            return await route.in_band.admit_without_key(upgrade)
        try:
            with tracing.maybe_child("admission.authenticate"):
                principal = await self._auth.authenticate(upgrade.api_key)
        except Exception:
            log.exception("authentication backend failed")
            return refuse("auth_unavailable", "cannot check API keys right now; retry")
        if principal is None:
            return refuse("unauthorized", "missing or invalid API key")
        if self.policy is not None:
            with tracing.maybe_child("admission.rate_limit"):
                refused = await self.policy.check_upgrade(principal)
            if refused is not None:
                return refused
        return await route.endpoint.admit(upgrade, principal)


class WsServer:
    def __init__(
        self, config: ServerConfig, metrics: Metrics, authenticator: Authenticator
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.router = Router(self, authenticator)
        self.connections: set[WsConnection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        # Live sessions on every route, WebSocket or HTTP; only session_opened/closed change it.
        self.session_count = 0
        self.now = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._acceptors: list[BatchAcceptor] = []
        self._tick_task: asyncio.Task[None] | None = None
        self._bound: BoundPort | None = None
        self._notice_over = asyncio.Event()
        self._closed_one = asyncio.Event()
        self.port = config.ws_port

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None,
                    bound: BoundPort | None = None) -> None:
        """Serve on `bound` (claimed and bound by the caller), else on `sock`, else claim and
        bind `config.host:ws_port` here."""
        loop = self._loop = asyncio.get_running_loop()
        self.now = loop.time()
        native.report()  # once per process: which hot-path modules run compiled (docs/native.md)
        if bound is None:
            bound = BoundPort([sock], None) if sock is not None else bind_port(
                self.config.host, self.config.ws_port, backlog=4096, deployment=deployment_id())
        self._bound = bound
        if bound.guard is not None:
            bound.guard.serve()
        self._acceptors = [BatchAcceptor(s, lambda: WsConnection(self), self.spawn)
                           for s in bound.sockets]
        for acceptor in self._acceptors:
            acceptor.start()
        self.port = bound.port
        self._tick_task = loop.create_task(self._housekeeping())

    async def stop_listening(self) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        self._acceptors = []
        if self._bound is not None and self._bound.guard is not None:
            self._bound.guard.close()
        self._bound = None

    def end_notice(self) -> None:
        """Skip what is left of the drain: every session is told to drain now and the notice
        ends (a second SIGTERM/SIGINT: the operator wants the process gone)."""
        self._notice_over.set()
        self._closed_one.set()  # wakes the drain loop, which sees the notice is over

    def _live_sessions(self) -> int:
        return sum(1 for conn in self.connections if conn.session is not None)

    async def drain(self, timeout_s: float, notice_s: float = 0.0,
                    timeouts_by_kind: Mapping[str, float] | None = None) -> None:
        """Refuse new upgrades (503 `draining`); let every live session run on, up to its
        kind's drain timeout (`timeouts_by_kind`, else `timeout_s`: a phone call may need
        minutes, a resumable stream is better resumed elsewhere soon), then ask it to finish
        (finals, then 1001) and give it DRAIN_FINISH_S to do so; keep the listeners open until
        the sessions have ended and at least `notice_s` has passed: a load balancer that polls
        /readyz or retries an upgrade sees 503 for the whole window, never a refused
        connection, until the listeners close at its end. Then what is left is cut."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        by_kind = dict(timeouts_by_kind or {})
        notice_end = started + min(notice_s, max([timeout_s, *by_kind.values()]))
        self.draining = True
        for conn in list(self.connections):
            if conn.session is None:
                conn.close(1001)
        told: set[WsConnection] = set()
        finish_by = started  # the last told session's end of its finishing time
        # Connections come and go during the window (each refused upgrade is one): count the
        # sessions at every close rather than wait for "no connection at all".
        while True:
            now = loop.time()
            now_for_all = self._notice_over.is_set()  # a second signal: no more running on
            next_due: float | None = None
            for conn in list(self.connections):
                session = conn.session
                if session is None or conn in told:
                    continue
                due = started + by_kind.get(conn.kind, timeout_s)
                if now_for_all or now >= due:
                    told.add(conn)
                    finish_by = max(finish_by, now + DRAIN_FINISH_S)
                    session.on_drain()
                elif next_due is None or due < next_due:
                    next_due = due
            if not self._live_sessions():
                break
            wake = next_due if next_due is not None else finish_by
            if next_due is None and now >= finish_by:
                break
            self._closed_one.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed_one.wait(), max(0.0, wake - now))
        deadline = max(finish_by, loop.time())
        left = self._live_sessions()
        log.info("drain: sessions ended" if not left else "drain: deadline reached",
                 extra={"sessions_left": left,
                        "elapsed_s": round(loop.time() - started, 3)})
        if loop.time() < notice_end:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._notice_over.wait(), notice_end - loop.time())
        log.info("drain: closing listeners",
                 extra={"port": self.port, "elapsed_s": round(loop.time() - started, 3)})
        await self.stop_listening()
        for conn in list(self.connections):
            conn.abort(1001)
        await self.close_tasks(max(0.5, deadline - loop.time()))

    async def close_tasks(self, timeout_s: float) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
            self._tick_task = None
        if self.tasks:
            _, pending = await asyncio.wait(list(self.tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)

    # --- bookkeeping ----------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Every task the server starts is tracked, so drain can await it and none leaks."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def session_opened(self) -> None:
        self.session_count += 1

    def session_closed(self) -> None:
        self.session_count -= 1

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed", exc_info=task.exception())

    def connection_opened(self, conn: WsConnection) -> None:
        self.connections.add(conn)
        self.metrics.connections_open.inc()

    def connection_closed(self, conn: WsConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.metrics.connections_open.dec()
            self._closed_one.set()

    # --- housekeeping ---------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.housekeeping_interval_s
        while True:
            await asyncio.sleep(interval)
            self.now = now = loop.time()
            try:
                self._sweep(now)
            except Exception:
                log.exception("housekeeping sweep failed")

    def _sweep(self, now: float) -> None:
        cfg = self.config
        for conn in list(self.connections):
            if conn.activity or (conn.reading_paused and not conn.write_paused):
                # Reading paused is our back pressure (a full queue on a slow engine, a lease
                # top-up): the peer is held back by us, not idle, and its pongs wait behind what
                # it sent. Not when our writes are stuck too: then the peer is not reading, and
                # the idle clock is what ends a session that would otherwise wait for ever.
                conn.activity = False
                conn.last_activity = now
            if conn.close_deadline is not None:
                if now > conn.close_deadline:
                    conn.abort()
                continue
            if conn.session is None:
                if not conn.is_open and now > conn.handshake_deadline and conn.path == "":
                    conn.abort()  # never sent a complete upgrade request
                continue
            if now - conn.last_activity > cfg.idle_timeout_s:
                conn.last_activity = now  # ask once per idle period, not per tick
                conn.session.on_idle()
            if conn.ping_sent_at is not None:
                if now - conn.ping_sent_at > cfg.ping_timeout_s:
                    conn.abort(1011)  # the peer is gone; no close handshake is possible
            elif now - max(conn.last_activity, conn.last_pong) > cfg.ping_interval_s:
                conn.send_ping(now)
