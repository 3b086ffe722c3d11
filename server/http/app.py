"""The HTTP port (aiohttp): /metrics, /healthz, /readyz. REST and admin APIs join it later."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.http.openapi import register
from server.telemetry.metrics import Metrics


def build_http_app(metrics: Metrics, is_ready: Callable[[], tuple[bool, str]]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, reason = is_ready()
        return web.json_response(
            {"status": "ready" if ready else "not_ready", "reason": reason},
            status=200 if ready else 503,
        )

    async def metrics_view(_: web.Request) -> web.Response:
        metrics.before_scrape()
        body = generate_latest(metrics.registry)
        resp = web.Response(body=body)
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        resp.charset = "utf-8"
        return resp

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    register(app, "/healthz", "get", {"summary": "liveness", "responses": {
        "200": {"description": "alive", "content": {"application/json": {"schema": status}}}}})
    register(app, "/readyz", "get", {"summary": "readiness (503 while draining)", "responses": {
        "200": {"description": "ready", "content": {"application/json": {"schema": status}}},
        "503": {"description": "not ready",
                "content": {"application/json": {"schema": status}}}}})
    return app
