"""TTS text backlog (issue 11, item 15) over a real socket: a client that sends short sentences
with `flush`, grants credit and never reads its audio is stopped by TCP back pressure once
`tts.session.max_pending_chars` wait for synthesis, instead of the server taking in all of it
(before: 50 MB accepted in ~12 s, RSS 77 -> 490 MB)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect

from server.config import TtsSessionConfig
from server.flow_control.text_backlog import READ_SLACK_CHARS
from tests.e2e.conftest import ServerProcess
from tests.e2e.test_tts_stream import AUTH, tts_url

pytestmark = pytest.mark.e2e
MAX_PENDING = TtsSessionConfig().max_pending_chars  # tests/e2e/server.toml keeps the default
OFFERED = 50_000_000
SENTENCES = "A short sentence for the speech engine to say out loud. " * 50  # ~2,850 chars


def session_log(server: ServerProcess, session_id: str, msg: str) -> list[dict[str, Any]]:
    return [e for e in server.logs()
            if e.get("msg") == msg and e.get("session_id") == session_id]


async def test_a_client_that_never_reads_audio_is_blocked_not_buffered(
    server: ServerProcess,
) -> None:
    ws = await connect(tts_url(server, model="synthetic"), additional_headers=AUTH,
                       max_queue=4, ping_interval=None)
    sent = 0
    sender: asyncio.Task[None] | None = None
    try:
        ready = json.loads(await ws.recv())
        session_id = str(ready["session_id"])
        await ws.send(json.dumps({"type": "credit", "bytes": OFFERED * 100}))
        message = json.dumps({"type": "text", "text": SENTENCES})
        flush = json.dumps({"type": "flush"})

        async def send_all() -> None:
            nonlocal sent
            while sent < OFFERED:
                await ws.send(message)
                await ws.send(flush)
                sent += len(SENTENCES)

        sender = asyncio.get_running_loop().create_task(send_all())
        # The server says when it stopped reading; then the client's sends stop going through
        # (its socket buffers fill): no progress over a few seconds, well short of the 50 MB.
        async with asyncio.timeout(60):
            while not session_log(server, session_id, "text backlog full: reading paused"):
                assert not sender.done(), f"all {sent} characters accepted"
                await asyncio.sleep(0.1)
            while True:
                before = sent
                await asyncio.sleep(2.0)
                if sent == before:
                    break
                assert not sender.done(), f"all {sent} characters accepted"
        assert not sender.done()
        assert sent < OFFERED // 2, sent
        [paused] = session_log(server, session_id, "text backlog full: reading paused")
        assert MAX_PENDING <= int(str(paused["pending_chars"])) <= MAX_PENDING + READ_SLACK_CHARS
    finally:
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
        ws.transport.abort()
        with contextlib.suppress(Exception):
            await ws.close()
    # What the server ever held for this session, from its last log line.
    async with asyncio.timeout(15):
        while True:  # the server logs it once the session settled
            ended = session_log(server, session_id, "session ended")
            if ended:
                break
            await asyncio.sleep(0.1)
    peak = int(str(ended[0]["text_backlog_peak"]))
    assert MAX_PENDING <= peak <= MAX_PENDING + READ_SLACK_CHARS, peak
    assert not [e for e in server.logs() if e.get("session_id") == session_id
                and (e.get("level") == "error" or "exc" in e)]
