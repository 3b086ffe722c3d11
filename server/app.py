"""Composition root: config -> engines, meters, auth -> WebSocket and HTTP servers -> drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import secrets
import signal
import sys

from aiohttp import web

from server.billing.auth import Authenticator, StaticKeyAuthenticator
from server.billing.bootstrap import ensure_dev_tenant, prepare_database
from server.billing.meter import MeterFactory, PricedMeterFactory
from server.billing.service import BillingService, UnmeteredRequests
from server.compat.deepgram.listen import DeepgramListenEndpoint
from server.compat.deepgram.speak import DeepgramSpeakEndpoint
from server.compat.sarvam.endpoint import (
    STT_PATH,
    TTS_PATH,
    SarvamSttEndpoint,
    SarvamTtsEndpoint,
    SubscriptionKeys,
)
from server.config import Config
from server.flow_control.http_body import HTTP_SHUTDOWN_MIN_GRACE_S
from server.http.admin import add_admin_routes
from server.http.app import build_http_app
from server.http.auth import install_api_auth
from server.http.llm import add_llm_routes
from server.http.openai_audio import add_openai_audio_routes
from server.http.openapi import add_openapi_route
from server.http.speech import add_speech_routes
from server.http.vision import add_vision_routes
from server.idempotency import reply_stores
from server.infra.stores import BillingUrls, dev_key_file, resolve_urls
from server.models.base import Synthesizer, Transcriber
from server.models.registry import aclose_all, build_transcribers, start_all
from server.models.tts_registry import aclose_all as close_synthesizers
from server.models.tts_registry import build_synthesizers
from server.models.tts_registry import start_all as start_synthesizers
from server.recording.endpoint import RecordingEndpoint, build_recorder
from server.sessions.asr_runner import AsrEndpoint
from server.sessions.resume import MemoryResumeStore, ResumeStore
from server.sessions.resume_redis import RedisResumeStore
from server.sessions.tts_runner import TtsEndpoint
from server.telemetry.logging import setup_logging
from server.telemetry.metrics import Metrics
from server.telemetry.tracing import TRACING, configure_from
from server.telephony.call.endpoint import TelephonyEndpoint
from server.ws.port_guard import BoundPort, PortInUse, bind_port, deployment_id
from server.ws.server import WsServer

log = logging.getLogger("streamgate")


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.engines: dict[str, Transcriber] = {}
        self.synthesizers: dict[str, Synthesizer] = {}
        self.ws: WsServer | None = None
        self._http: web.AppRunner | None = None
        self.http_port = config.server.http_port
        self._stop = asyncio.Event()
        self._started = False
        self._stopping = False
        self._ws_port: BoundPort | None = None
        self._http_port: BoundPort | None = None
        self.billing: BillingService | None = None
        self.telephony: TelephonyEndpoint | None = None
        self.resume_store: ResumeStore | None = None
        self.requests: BillingService | UnmeteredRequests = UnmeteredRequests()
        self.billing_urls: BillingUrls | None = None
        self.admin_token = ""
        self.dev_key: str | None = None
        # record=true sessions (docs/recording.md): a recorder always (it refuses record=true
        # while off); the retention sweeper only when recording is on.
        self.recorder, self.retention = build_recorder(config.recording)

    async def _start_billing(self) -> BillingService:
        cfg = self.config
        urls = self.billing_urls = await resolve_urls(cfg)
        await prepare_database(cfg, urls.database_url)
        billing = BillingService(cfg.billing, report_interval_s=cfg.asr.session.usage_interval_s)
        await billing.start(urls.redis_url, urls.database_url)
        if urls.services is not None and cfg.billing.dev_tenant:
            self.dev_key = await ensure_dev_tenant(cfg, billing, dev_key_file(cfg))
        return billing

    def _bind(self) -> None:
        """Claim and bind both ports before anything else starts: a second server on the same
        ports must fail at once, before it touches engines or the billing stores."""
        srv, deployment = self.config.server, deployment_id()
        self._ws_port = bind_port(srv.host, srv.ws_port, backlog=4096, deployment=deployment)
        try:
            self._http_port = bind_port(srv.host, srv.http_port, backlog=128,
                                        deployment=deployment)
        except BaseException:
            self._ws_port.close()
            self._ws_port = None
            raise

    def _release_ports(self) -> None:
        for bound in (self._ws_port, self._http_port):
            if bound is not None:
                bound.close()
        self._ws_port = self._http_port = None

    async def start(self) -> None:
        self._bind()
        try:
            await self._start_serving()
        except BaseException:
            self._release_ports()
            raise

    async def _start_serving(self) -> None:
        cfg = self.config
        self.engines = build_transcribers(cfg.asr.models, self.metrics)
        await start_all(self.engines)
        self.synthesizers = build_synthesizers(cfg.tts.models)
        await start_synthesizers(self.synthesizers)
        auth: Authenticator
        meters: MeterFactory
        if cfg.billing.enabled:
            billing = self.billing = await self._start_billing()
            auth, meters = billing, billing
        else:
            prices = {(name, "audio_ms"): (m.price_micros_per_minute, 60000)
                      for name, m in cfg.asr.models.items()}
            prices.update({(name, "characters"): (t.price_micros_per_1k_chars, 1000)
                           for name, t in cfg.tts.models.items()})
            auth = StaticKeyAuthenticator(cfg.auth.key_sha256,
                                          allow_anonymous=cfg.auth.allow_anonymous)
            meters = PricedMeterFactory(prices)
        ws = self.ws = WsServer(cfg.server, self.metrics, auth)
        ws.router.policy = self.billing
        # Resume points in Redis (any node can resume a session) when billing has one.
        resume_store: ResumeStore = (RedisResumeStore(self.billing.redis)
                                     if self.billing is not None else MemoryResumeStore())
        self.resume_store = resume_store
        asr_endpoint = AsrEndpoint(
            config=cfg, engines=self.engines, meters=meters, server=ws, metrics=self.metrics,
            resume_store=resume_store,
        )
        ws.router.add("/v1/asr/stream", RecordingEndpoint(asr_endpoint, self.recorder))
        self.telephony = TelephonyEndpoint(
            config=cfg, asr=asr_endpoint, tts_engines=self.synthesizers, meters=meters,
            authenticator=auth, server=ws, metrics=self.metrics, policy=self.billing,
        )
        ws.router.add_in_band("/v1/telephony/twilio", self.telephony)
        tts_endpoint = TtsEndpoint(
            config=cfg, engines=self.synthesizers, meters=meters, server=ws, metrics=self.metrics,
            resume_store=resume_store,
        )
        ws.router.add("/v1/tts/stream", RecordingEndpoint(tts_endpoint, self.recorder))
        # Deepgram's live STT and streaming TTS sockets (docs/compat.md, "Deepgram").
        ws.router.add("/v1/listen", DeepgramListenEndpoint(asr_endpoint))
        ws.router.add("/v1/speak", DeepgramSpeakEndpoint(tts_endpoint))
        # Sarvam's streaming paths; its key comes in its own header (docs/compat.md, "Sarvam").
        sarvam_keys = SubscriptionKeys(auth, self.billing)
        ws.router.add_in_band(STT_PATH, SarvamSttEndpoint(asr=asr_endpoint, keys=sarvam_keys))
        ws.router.add_in_band(TTS_PATH, SarvamTtsEndpoint(tts=tts_endpoint, keys=sarvam_keys))
        if self.retention is not None:
            self.retention.start()
        await ws.start(bound=self._ws_port)
        self._ws_port = None  # the WebSocket server owns it now
        app = build_http_app(self.metrics, self._readiness,
                             body_timeout_s=cfg.server.http_body_timeout_s)
        install_api_auth(app, auth, self.billing)
        add_openapi_route(app)
        # Idempotency-Key answers: in Redis (every worker and node) whenever billing has one.
        replies = reply_stores(self.billing.redis if self.billing is not None else None)
        add_speech_routes(app, asr=asr_endpoint, tts=tts_endpoint, replies=replies)
        add_openai_audio_routes(app, asr=asr_endpoint, tts=tts_endpoint, llm_models={
            name for provider in cfg.llm.providers for name in provider.models})
        self.requests = self.billing if self.billing is not None else UnmeteredRequests()
        add_llm_routes(app, config=cfg.llm, metrics=self.metrics, requests=self.requests,
                       replies=replies)
        add_vision_routes(app, config=cfg.vision, metrics=self.metrics, requests=self.requests,
                          replies=replies)
        if self.billing is not None:
            self.admin_token = cfg.billing.admin_token or secrets.token_urlsafe(24)
            add_admin_routes(app, self.billing, self.admin_token)
        # lingering_time=0: aiohttp would otherwise keep reading an unread body for 10 s after
        # the request, in a task that neither a vanished client nor shutdown ends (a leaked task
        # at exit); the body middleware does that discard inside the request instead.
        self._http = web.AppRunner(app, access_log=None, handle_signals=False,
                                   lingering_time=0)
        await self._http.setup()
        http_bound = self._http_port
        assert http_bound is not None
        for sock in http_bound.sockets:
            await web.SockSite(self._http, sock).start()
        if http_bound.guard is not None:
            http_bound.guard.serve()
        self.http_port = http_bound.port
        self._started = True
        self.metrics.start_publishing()  # one of several workers: gauges for the node's /metrics

    def _readiness(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting"
        if self.ws is None or self.ws.draining:
            return False, "draining"
        return True, ""

    def request_stop(self) -> None:
        if self._stop.is_set() and self.ws is not None:
            self.ws.end_notice()  # a second signal: no more waiting for load balancers
        self._stop.set()

    def handle_stop_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def serve_until_stopped(self) -> None:
        self.handle_stop_signals()
        await self._stop.wait()
        await self.stop()
        log.info("drain complete")

    async def _close_http(self, drain_deadline: float) -> None:
        """Close the HTTP listener, then give requests still running what is left of the drain
        window (at least HTTP_SHUTDOWN_MIN_GRACE_S): aiohttp then fails their body reads (503
        `draining` from the body middleware) and cancels what still runs. runner.cleanup()
        alone would wait its fixed shutdown_timeout (60 s) for a stalled upload."""
        runner = self._http
        assert runner is not None
        for site in runner.sites:
            await site.stop()
        server = runner.server
        if server is not None:
            await asyncio.sleep(0)  # as cleanup() does: connections just accepted get going
            server.pre_shutdown()  # idle keep-alive connections close now
            grace_s = max(drain_deadline - asyncio.get_running_loop().time(),
                          HTTP_SHUTDOWN_MIN_GRACE_S)
            await server.shutdown(grace_s)
        await runner.cleanup()  # the app's cleanup contexts (upstream clients); no connections

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.metrics.stop_publishing()
        srv = self.config.server
        drain_deadline = asyncio.get_running_loop().time() + srv.drain_timeout_s
        if self.ws is not None:
            # From here /readyz answers 503 and upgrades 503 `draining` until the listeners
            # close at the end of the window (WsServer.drain).
            log.info("drain started", extra={
                "timeout_s": srv.drain_timeout_s,
                "telephony_timeout_s": srv.telephony_drain_timeout_s,
                "notice_s": min(srv.drain_notice_s,
                                max(srv.drain_timeout_s, srv.telephony_drain_timeout_s))})
            await self.ws.drain(srv.drain_timeout_s, srv.drain_notice_s,
                                {"telephony": srv.telephony_drain_timeout_s})
        if self.telephony is not None:
            await self.telephony.aclose()  # the agent's HTTP client, after the calls ended
        if self._http is not None:
            await self._close_http(drain_deadline)
            self._http = None
            log.info("drain: listeners closed")
        self._release_ports()
        if self.retention is not None:
            await self.retention.stop()
        await aclose_all(self.engines)
        await close_synthesizers(self.synthesizers)
        if self.resume_store is not None:
            await self.resume_store.aclose()  # the last sessions' saves, before Redis closes
        if self.billing is not None:
            await self.billing.stop()  # after the sessions settled: the flusher goes last
        if self.billing_urls is not None and self.billing_urls.services is not None:
            await asyncio.to_thread(self.billing_urls.services.stop)


async def serve(config: Config) -> int:
    setup_logging(config.logging.level, config.logging.json)
    configure_from(config.tracing)
    gateway = Gateway(config)
    try:
        await gateway.start()
    except PortInUse as exc:
        print(f"streamgate: {exc}", file=sys.stderr, flush=True)
        return 2
    assert gateway.ws is not None
    # Before announcing ourselves: whoever saw `listening` may stop us at once (a supervisor's
    # worker), and must get a drain rather than the default action of the signal.
    gateway.handle_stop_signals()
    # One machine-readable line on stdout: scripts and tests learn the bound ports from it.
    print(json.dumps({"event": "listening", "host": config.server.host,
                      "ws_port": gateway.ws.port, "http_port": gateway.http_port}), flush=True)
    if gateway.billing is not None and not config.billing.admin_token:
        # Secrets go to the terminal that started us, never into the logs.
        print(json.dumps({"event": "admin_token", "admin_token": gateway.admin_token}),
              flush=True)
    if gateway.dev_key is not None:
        print(json.dumps({"event": "dev_api_key", "tenant_id": "dev", "api_key": gateway.dev_key,
                          "saved_in": str(dev_key_file(config))}), flush=True)
    log.info("listening", extra={"ws_port": gateway.ws.port, "http_port": gateway.http_port})
    # What start-up made (modules, config, engines, pools: ~70k objects) lives as long as the
    # process: keep it out of every later full collection, whose pause grows with what it
    # scans (at 450 real-time sessions the longest went from 57 ms to 21 ms).
    gc.collect()
    gc.freeze()
    await gateway.serve_until_stopped()
    # Drained: a late signal (an operator's second one, forwarded by the supervisor just as this
    # worker finished) must not end the process on its way out with a signal's exit status.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    TRACING.shutdown()  # the exporter sends what it still holds
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
