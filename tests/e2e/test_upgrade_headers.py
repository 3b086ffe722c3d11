"""Upgrade requests with a header we read given twice: 400 `bad_request` JSON, no traceback."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest

from tests.e2e.conftest import TEST_KEY, ServerProcess

pytestmark = pytest.mark.e2e


async def raw_upgrade(server: ServerProcess, path: str, extra: list[tuple[str, str]]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ws_port)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{server.ws_port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             *(f"{name}: {value}" for name, value in extra)]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if head.startswith(b"HTTP/1.1 101 "):
            return head
        return head + await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("path", ["/v1/asr/stream", "/v1/tts/stream", "/v1/telephony/twilio"])
async def test_two_authorization_headers_are_a_bad_request(server: ServerProcess,
                                                           path: str) -> None:
    before = len(server.stderr_lines)
    reply = await raw_upgrade(server, path, [("Authorization", f"Bearer {TEST_KEY}"),
                                             ("Authorization", "Bearer other")])
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 400 Bad Request"
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request"
    assert "Authorization" in error["message"]
    await asyncio.sleep(0.2)  # the rejection's log line
    logged = "\n".join(server.stderr_lines[before:])
    assert "Traceback" not in logged and "MultipleValuesError" not in logged
    assert TEST_KEY not in logged


async def test_one_authorization_header_still_works(server: ServerProcess) -> None:
    reply = await raw_upgrade(server, "/v1/asr/stream",
                              [("Authorization", f"Bearer {TEST_KEY}")])
    assert reply.startswith(b"HTTP/1.1 101 ")
