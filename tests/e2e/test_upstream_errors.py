"""Issue 11 item 10: what a client is told when an upstream is down, against a real `streamgate
serve` whose four kinds of upstream (LLM provider, ASR and TTS engines, vision model) point at a
closed loopback port. The answer names the configured upstream and a fixed cause
(server/models/upstream_errors.py); the host, the port and the exception stay in the log.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from tests.e2e.conftest import TEST_KEY, ServerProcess, start_server
from tests.e2e.test_asr_stream import drain_to_close, recv_json, stream_with_credit, url
from tests.e2e.test_vision_http import SCHEMA, encode, form, text_page
from tests.fakes.upstream import closed_port_url

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 20}


@pytest.fixture(scope="module")
def down() -> str:
    return closed_port_url()


@pytest.fixture(scope="module")
def srv(down: str) -> Iterator[ServerProcess]:
    fast = "connect_timeout_s=1.0, retries=0"
    server = start_server({
        "STREAMGATE_LLM__PROVIDERS":
            f'[{{name="local-vllm", url="{down}", models={{chat="m"}}, {fast}}}]',
        "STREAMGATE_ASR__MODELS__UPASR": f'{{engine="upstream", url="{down}", retries=0}}',
        "STREAMGATE_TTS__MODELS__UPTTS": f'{{engine="upstream", url="{down}", retries=0}}',
        "STREAMGATE_VISION__VLM__ENABLED": "true",
        "STREAMGATE_VISION__VLM__URL": f'"{down}"',
        "STREAMGATE_VISION__VLM__MODEL": '"vlm"',
        "STREAMGATE_VISION__VLM__RETRIES": "0",
    })
    yield server
    code = server.stop()
    tail = "\n".join(server.stderr_lines[-40:])
    assert code == 0, f"server exited with {code}:\n{tail}"


def assert_no_leak(text: str, down: str) -> None:
    host_port = down.removeprefix("http://")
    port = host_port.rsplit(":", 1)[1]
    for leak in (host_port, port, "127.0.0.1", "ClientConnector", "Cannot connect",
                 "Connect call failed", "ConnectionRefused", "Errno", "ssl:"):
        assert leak not in text, (leak, text)


def logged(srv: ServerProcess, logger: str) -> str:
    return "\n".join(json.dumps(r) for r in srv.logs() if r.get("logger") == logger)


async def test_llm_upstream_down(srv: ServerProcess, down: str) -> None:
    async with aiohttp.ClientSession(srv.http, headers=AUTH) as http:
        for body in (CHAT, {**CHAT, "stream": True}):
            async with http.post("/v1/chat/completions", json=body) as resp:
                status, text = resp.status, await resp.text()
            assert status == 502, text
            error = json.loads(text)["error"]
            assert error["code"] == "upstream_error"
            assert "provider 'local-vllm' unavailable: connect failed" in error["message"]
            assert_no_leak(text, down)
    log = logged(srv, "streamgate.llm")
    assert down.removeprefix("http://") in log and "ClientConnectorError" in log


async def test_tts_upstream_down(srv: ServerProcess, down: str) -> None:
    async with aiohttp.ClientSession(srv.http, headers=AUTH) as http:
        async with http.post("/v1/tts/synthesize",
                             json={"text": "Hello there.", "model": "uptts"}) as resp:
            status, text = resp.status, await resp.text()
    assert status == 502, text
    assert "provider 'uptts' unavailable: connect failed" in json.loads(text)["error"]["message"]
    assert_no_leak(text, down)
    log = logged(srv, "server.models.tts_upstream")
    assert down.removeprefix("http://") in log and "ClientConnectorError" in log


async def test_asr_upstream_down(srv: ServerProcess, down: str, speech: bytes) -> None:
    async with connect(url(srv, model="upasr"), additional_headers=AUTH) as ws:
        ready = await recv_json(ws)
        seen: list[dict[str, Any]] = []
        await stream_with_credit(ws, speech, ready, seen)
        await ws.send(json.dumps({"type": "close"}))
        seen += await drain_to_close(ws)
    errors = [m for m in seen if m["type"] == "error"]
    assert errors and errors[0]["code"] == "engine_error", seen
    assert "provider 'upasr' unavailable: connect failed" in errors[0]["message"]
    assert_no_leak(json.dumps(errors), down)
    log = logged(srv, "server.models.upstream")
    assert down.removeprefix("http://") in log and "ClientConnectorError" in log


async def test_vision_model_down(srv: ServerProcess, down: str) -> None:
    image = await asyncio.to_thread(lambda: encode(text_page()))
    async with aiohttp.ClientSession(srv.http, headers=AUTH) as http:
        async with http.post("/v1/vision/extract",
                             data=form(image, "image/png", schema=json.dumps(SCHEMA))) as resp:
            status, text = resp.status, await resp.text()
    assert status == 503, text
    error = json.loads(text)["error"]
    assert error["code"] == "upstream_unavailable"
    assert "provider 'vlm:vlm' unavailable: connect failed" in error["message"]  # role:model
    assert_no_leak(text, down)
    log = logged(srv, "server.vision.chat")
    assert down.removeprefix("http://") in log and "ClientConnectorError" in log
