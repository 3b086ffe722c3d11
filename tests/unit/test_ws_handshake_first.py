"""websockets judges the upgrade before admission does: a request it refuses never reaches the
router, whose admission authenticates, spends a rate-limit token, counts a concurrent session and
reserves a lease (found by the hostile-input suite: a refused upgrade with a valid key left a
zero-cost usage event for a session that never existed).

No event loop: admission is a coroutine that never suspends here, driven by hand.
"""

from __future__ import annotations

import json

import pytest
from websockets.http11 import Request

from loadtest.hotpath import MemoryTransport, upgrade_bytes
from server.protocol.errors import Rejected
from server.sessions.upgrade import Admitted, SessionSocket
from server.ws.connection import WsConnection
from tests.unit.test_ws_fast_path import LoopFreeServer

GOOD = upgrade_bytes("/v1/asr/stream")
KEY_LINE = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


class Session:
    def on_text(self, data: bytes) -> None:
        pass

    def on_binary(self, data: bytes) -> None:
        pass

    def on_read_done(self) -> None:
        pass

    def on_writable(self) -> None:
        pass

    def on_idle(self) -> None:
        pass

    def on_drain(self) -> None:
        pass

    def on_connection_closed(self, code: int) -> None:
        pass


class RecordingRouter:
    """Admits everything (or refuses with `refusal`) and writes down what it was asked and what
    was started or cancelled: a cancel stands for a lease settled and a usage event written."""

    def __init__(self, refusal: Rejected | None = None) -> None:
        self.refusal = refusal
        self.admitted: list[str] = []
        self.started = 0
        self.cancelled = 0

    async def admit(self, request: Request, conn: WsConnection) -> Admitted | Rejected:
        self.admitted.append(request.path)
        if self.refusal is not None:
            return self.refusal
        return Admitted(start=self._start, cancel=self._cancel)

    def _start(self, conn: SessionSocket) -> Session:
        self.started += 1
        return Session()

    def _cancel(self) -> None:
        self.cancelled += 1


def upgrade(request: bytes, router: RecordingRouter
            ) -> tuple[int, dict[str, str], bytes, MemoryTransport, LoopFreeServer]:
    server = LoopFreeServer(router)
    transport = MemoryTransport(keep=True)
    conn = WsConnection(server)  # type: ignore[arg-type]
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(request)
    head, _, body = bytes(transport.out or b"").partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body, transport, server


def rejected_count(server: LoopFreeServer, status: int) -> float:
    value = server.metrics.registry.get_sample_value(
        "streamgate_upgrades_rejected_total", {"status": str(status)})
    return value or 0.0


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (GOOD.replace(b"GET ", b"CONNECT ", 1), 405),
        (GOOD.replace(b"GET ", b"POST ", 1), 405),
        (GOOD.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 12"), 400),
        (GOOD.replace(KEY_LINE, b"Sec-WebSocket-Key: not-base64!\r\n"), 400),
        (GOOD.replace(KEY_LINE, b"Sec-WebSocket-Key: c2hvcnQ=\r\n"), 400),  # 5 bytes, not 16
        (GOOD.replace(KEY_LINE, KEY_LINE * 2), 400),
        (GOOD.replace(KEY_LINE, b""), 400),
        (GOOD.replace(b"Upgrade: websocket\r\n", b""), 426),
        (GOOD.replace(b"Connection: Upgrade\r\n", b"Connection: keep-alive\r\n"), 426),
        # websockets says 505; HTTP/1 is served, the request is wrong: no 5xx (RFC 6455 4.2.1)
        (GOOD.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1), 400),
    ],
)
def test_an_invalid_upgrade_is_refused_before_admission(request_bytes: bytes,
                                                        status: int) -> None:
    router = RecordingRouter()
    got, headers, body, transport, server = upgrade(request_bytes, router)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert transport.closed
    # Never asked: no authentication, no rate-limit token, no lease, hence nothing to cancel.
    assert router.admitted == [] and router.cancelled == 0 and router.started == 0
    assert rejected_count(server, status) == 1


def test_a_valid_upgrade_is_admitted_then_switches_protocols() -> None:
    router = RecordingRouter()
    got, headers, _, transport, _ = upgrade(GOOD, router)
    assert got == 101 and headers["upgrade"] == "websocket"
    assert router.admitted == ["/v1/asr/stream"] and router.started == 1
    assert router.cancelled == 0 and not transport.closed and not transport.paused


def test_an_admission_refusal_of_a_valid_upgrade_is_its_own_json_answer() -> None:
    router = RecordingRouter(Rejected(402, "insufficient_balance", "top up",
                                      {"Retry-After": "1"}))
    got, headers, body, transport, _ = upgrade(GOOD, router)
    assert got == 402 and headers["retry-after"] == "1"
    assert json.loads(body) == {"error": {"code": "insufficient_balance", "message": "top up"}}
    assert router.admitted == ["/v1/asr/stream"] and router.started == 0
    assert transport.closed
