"""Tracing against a real server process (issue 17): with `[tracing] enabled`, a client's
`traceparent` on the upgrade makes the session part of the client's trace: `ready` names the
trace and the session's JSON log lines carry it, with their span ids."""

from __future__ import annotations

import json
from typing import Any

from websockets.asyncio.client import connect

from tests.e2e.conftest import start_server, wait_for
from tests.speech import silence

TEST_KEY = "test-key"
CLIENT_TRACE = "5b8aa5a2d2c872e8321cf37308d69df2"
TRACEPARENT = f"00-{CLIENT_TRACE}-051581bf3cb55c13-01"


async def test_ready_and_log_lines_carry_the_clients_trace() -> None:
    srv = start_server({"STREAMGATE_TRACING__ENABLED": "true",
                        "STREAMGATE_TRACING__EXPORTER": "none"})
    try:
        events: list[dict[str, Any]] = []
        async with connect(f"{srv.ws}/v1/asr/stream?model=synthetic",
                           additional_headers={"Authorization": f"Bearer {TEST_KEY}",
                                               "traceparent": TRACEPARENT}) as ws:
            await ws.send(silence(200))
            await ws.send(json.dumps({"type": "close"}))
            async for raw in ws:
                events.append(json.loads(raw))
        assert events[0]["type"] == "ready" and events[0]["trace_id"] == CLIENT_TRACE

        def ended() -> bool:
            return any(line.get("msg") == "session ended" for line in srv.logs())

        wait_for(ended)
        lines = [line for line in srv.logs() if line.get("session_id") ==
                 events[0]["session_id"]]
        assert {line["msg"] for line in lines} >= {"session started", "session ended"}
        assert all(line["trace_id"] == CLIENT_TRACE for line in lines)
        assert all(len(str(line["span_id"])) == 16 for line in lines if "span_id" in line)

        # A TTS session without a traceparent: a trace of its own, named in `ready`.
        async with connect(f"{srv.ws}/v1/tts/stream",
                           additional_headers={"Authorization": f"Bearer {TEST_KEY}"}) as ws:
            ready = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "close"}))
            async for _ in ws:
                pass
        assert ready["type"] == "ready"
        assert len(ready["trace_id"]) == 32 and ready["trace_id"] != CLIENT_TRACE
    finally:
        assert srv.stop() == 0
