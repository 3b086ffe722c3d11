"""The Deepgram listen session (server/compat/deepgram/listen.py) on our real ASR endpoint and
runner, with a fake socket, a fake clock and a fake engine (tests/unit/test_asr_runner.py's):
what a socket test cannot reach in reasonable time, because loopback kernel buffers take
megabytes of results before our write buffer backs up."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from server.billing.auth import ANONYMOUS, StaticKeyAuthenticator
from server.billing.meter import PricedMeterFactory
from server.compat.deepgram.listen import DeepgramListenEndpoint, ListenSession
from server.sessions.asr_runner import AsrEndpoint
from server.sessions.upgrade import Admitted, UpgradeRequest
from server.telemetry.metrics import Metrics
from server.ws.server import WsServer
from tests.speech import espeak_pcm16, silence
from tests.unit.test_asr_runner import FakeClock, FakeEngine, config, settle_loop
from tests.unit.test_deepgram_wire import FakeSocket

FRAME = 3200  # 100 ms of 16 kHz linear16
SPEECH = silence(300) + espeak_pcm16("hello there, how are you") + silence(900)


class BackingUpSocket(FakeSocket):
    """A socket whose write buffer goes above its high mark on a flush, once told to (the
    client stopped reading): as asyncio calls `pause_writing` from inside the write."""

    backs_up = False

    def flush(self) -> None:
        if self.backs_up:
            self.write_paused = True


async def open_listen(query: dict[str, str]) -> tuple[ListenSession, BackingUpSocket,
                                                       FakeClock, WsServer]:
    cfg = config()
    metrics = Metrics()
    server = WsServer(cfg.server, metrics, StaticKeyAuthenticator(cfg.auth.key_sha256,
                                                                  allow_anonymous=True))
    server._loop = asyncio.get_running_loop()  # spawn() without listening
    asr = AsrEndpoint(config=cfg, engines={"fake": FakeEngine()},
                      meters=PricedMeterFactory({}), server=server, metrics=metrics)
    clock = FakeClock()
    admitted = await DeepgramListenEndpoint(asr, clock=clock).admit(
        UpgradeRequest(path="/v1/listen", query=query, api_key=None), ANONYMOUS)
    assert isinstance(admitted, Admitted)
    sock = BackingUpSocket()
    session = admitted.start(sock)
    assert isinstance(session, ListenSession)
    await settle_loop()
    return session, sock, clock, server


async def feed(session: ListenSession, audio: bytes) -> None:
    for i in range(0, len(audio), FRAME):
        session.on_binary(audio[i:i + FRAME])
        session.on_read_done()
        await settle_loop(3)


def sent(sock: FakeSocket) -> list[dict[str, Any]]:
    return [json.loads(d) for d in sock.sent]


async def test_a_client_that_reads_no_results_is_closed_after_the_idle_timeout() -> None:
    session, sock, clock, server = await open_listen(
        {"model": "fake", "encoding": "linear16", "sample_rate": "16000",
         "interim_results": "true"})
    await feed(session, SPEECH)
    await settle_loop()
    assert [m["is_final"] for m in sent(sock) if m["type"] == "Results"][-1]
    # The client stops reading: the next results we write back up our write buffer, which
    # starts the clock; the runner takes no more audio meanwhile.
    sock.backs_up = True
    before = len(sock.sent)
    await feed(session, SPEECH)
    await settle_loop()
    assert sock.write_paused and len(sock.sent) > before and sock.closed is None
    clock.advance(config().server.idle_timeout_s - 0.1)
    assert sock.closed is None
    clock.advance(0.2)
    assert sock.closed == (1008, "client_not_reading")
    assert sent(sock)[-1] == {"type": "Error", "variant": "client_not_reading",
                              "description": "client stopped reading results"}
    session.on_connection_closed(1008)  # the connection ends: the session settles, no leak
    await settle_loop()
    assert all(t.done() for t in server.tasks)


async def test_a_client_that_reads_again_in_time_is_not_closed() -> None:
    session, sock, clock, server = await open_listen(
        {"model": "fake", "encoding": "linear16", "sample_rate": "16000",
         "interim_results": "true"})
    sock.backs_up = True
    await feed(session, SPEECH)
    await settle_loop()
    assert sock.write_paused
    clock.advance(config().server.idle_timeout_s - 0.5)
    sock.backs_up = sock.write_paused = False  # it read: the buffer drained
    session.on_writable()
    clock.advance(1.0)
    assert sock.closed is None
    session.on_text(b'{"type": "CloseStream"}')
    session.on_read_done()
    await settle_loop()
    assert sock.closed == (1000, "")
    assert sent(sock)[-1]["type"] == "Metadata"
    session.on_connection_closed(1000)
    await settle_loop()
    assert all(t.done() for t in server.tasks)
