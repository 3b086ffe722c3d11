"""Composition root: config -> engines, meters, auth -> WebSocket and HTTP servers -> drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys

from aiohttp import web

from server.billing.auth import StaticKeyAuthenticator
from server.billing.meter import PricedMeterFactory
from server.config import Config
from server.http.app import build_http_app
from server.models.base import Transcriber
from server.models.registry import aclose_all, build_transcribers, start_all
from server.sessions.asr_runner import AsrEndpoint
from server.telemetry.logging import setup_logging
from server.telemetry.metrics import Metrics
from server.ws.server import WsServer

log = logging.getLogger("streamgate")


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.engines: dict[str, Transcriber] = {}
        self.ws: WsServer | None = None
        self._http: web.AppRunner | None = None
        self.http_port = config.server.http_port
        self._stop = asyncio.Event()
        self._started = False

    async def start(self) -> None:
        cfg = self.config
        self.engines = build_transcribers(cfg.asr.models, self.metrics)
        await start_all(self.engines)
        prices = {name: model.price_micros_per_minute for name, model in cfg.asr.models.items()}
        auth = StaticKeyAuthenticator(cfg.auth.key_sha256, allow_anonymous=cfg.auth.allow_anonymous)
        ws = self.ws = WsServer(cfg.server, self.metrics, auth)
        ws.router.endpoints["/v1/asr/stream"] = AsrEndpoint(
            config=cfg, engines=self.engines, meters=PricedMeterFactory(prices), server=ws,
            metrics=self.metrics,
        )
        await ws.start()
        self._http = web.AppRunner(build_http_app(self.metrics, self._readiness),
                                   access_log=None, handle_signals=False)
        await self._http.setup()
        site = web.TCPSite(self._http, cfg.server.host, cfg.server.http_port, reuse_port=True)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.http_port = server.sockets[0].getsockname()[1]
        self._started = True

    def _readiness(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting"
        if self.ws is None or self.ws.draining:
            return False, "draining"
        return True, ""

    def request_stop(self) -> None:
        self._stop.set()

    async def serve_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self._stop.wait()
        log.info("drain started", extra={"timeout_s": self.config.server.drain_timeout_s})
        await self.stop()

    async def stop(self) -> None:
        if self.ws is not None:
            await self.ws.drain(self.config.server.drain_timeout_s)
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        await aclose_all(self.engines)


async def serve(config: Config) -> int:
    setup_logging(config.logging.level, config.logging.json)
    gateway = Gateway(config)
    await gateway.start()
    assert gateway.ws is not None
    # One machine-readable line on stdout: scripts and tests learn the bound ports from it.
    print(json.dumps({"event": "listening", "host": config.server.host,
                      "ws_port": gateway.ws.port, "http_port": gateway.http_port}), flush=True)
    log.info("listening", extra={"ws_port": gateway.ws.port, "http_port": gateway.http_port})
    await gateway.serve_until_stopped()
    return _leaked_tasks()


def _leaked_tasks() -> int:
    """With STREAMGATE_STRICT_TASKS=1 (the test suite sets it), any task left is an error."""
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    if leaked and os.environ.get("STREAMGATE_STRICT_TASKS") == "1":
        for task in leaked:
            print(f"leaked task: {task!r}", file=sys.stderr)
        return 3
    return 0


def run(config: Config) -> int:
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        return uvloop.run(serve(config))
    return 0
