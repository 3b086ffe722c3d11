"""A usage report that swallows its cancellation must not keep a finished session alive.

redis-py can turn a cancellation that lands inside a command into its own ConnectionError,
which the wallet meter handles as "report deferred" and returns: the report loop then never saw
the CancelledError its session sent it, went on reporting forever, and the session never
finished (no summary, no close, lease never settled). Found under load by the 200-sessions
billing test; reproduced here with a fake meter, no Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.frames import Frame, Opcode

from loadtest.hotpath import MemoryTransport, upgrade_bytes
from server.billing.auth import StaticKeyAuthenticator
from server.billing.meter import PricedMeter, UsageReport
from server.config import load_config
from server.models.registry import aclose_all, build_transcribers, start_all
from server.sessions.asr_runner import AsrEndpoint
from server.telemetry.metrics import Metrics
from server.ws.connection import WsConnection
from server.ws.server import WsServer


class SwallowingMeter(PricedMeter):
    """report() blocks until cancelled, then returns normally, as a swallowed cancel does."""

    def __init__(self) -> None:
        super().__init__(0)
        self.in_report = asyncio.Event()
        self.swallowed = 0

    async def report(self) -> UsageReport:
        self.in_report.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.swallowed += 1  # redis-py: CancelledError -> ConnectionError -> "deferred"
        return await super().report()


class Meters:
    def __init__(self) -> None:
        self.meter = SwallowingMeter()

    async def open(self, **_: Any) -> SwallowingMeter:
        return self.meter


def client_frame(opcode: Opcode, payload: bytes) -> bytes:
    return Frame(opcode, payload).serialize(mask=True, extensions=[])


async def test_session_finishes_when_its_report_swallows_the_cancel() -> None:
    config = load_config(overrides={
        "auth": {"allow_anonymous": True}, "billing": {"enabled": False},
        "asr": {"session": {"default_model": "synthetic", "usage_interval_s": 0.05},
                "models": {"synthetic": {"engine": "synthetic"}}},
    })
    metrics = Metrics()
    engines = build_transcribers({"synthetic": config.asr.models["synthetic"]}, metrics)
    await start_all(engines)
    server = WsServer(config.server, metrics, StaticKeyAuthenticator(
        config.auth.key_sha256, allow_anonymous=True))
    await server.start()
    meters = Meters()
    endpoint = AsrEndpoint(config=config, engines=engines, meters=meters,  # type: ignore[arg-type]
                           server=server, metrics=metrics)
    server.router.add("/v1/asr/stream", endpoint)
    try:
        transport = MemoryTransport(keep=True)
        conn = WsConnection(server)
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(upgrade_bytes(
            "/v1/asr/stream?model=synthetic&encoding=pcm_s16le&sample_rate=16000"))
        async with asyncio.timeout(5):
            while conn.session is None:  # noqa: ASYNC110 - admission runs as a server task
                await asyncio.sleep(0.01)
            conn.data_received(client_frame(Opcode.BINARY, b"\x00\x00" * 1600))
            await meters.meter.in_report.wait()  # a report is in flight...
            conn.data_received(client_frame(Opcode.TEXT, b'{"type":"close"}'))  # ...close
            while endpoint.runners:  # noqa: ASYNC110 - the session's own task removes it
                await asyncio.sleep(0.01)
        assert meters.meter.swallowed == 1
        assert transport.out is not None and b'"type":"summary"' in transport.out
        assert conn.close_code == 1000
    finally:
        await server.close_tasks(2.0)
        await server.stop_listening()
        await aclose_all(engines)
