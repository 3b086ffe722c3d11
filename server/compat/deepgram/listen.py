"""Deepgram's live speech-to-text socket (`/v1/listen`) on our ASR sessions.

Not a second pipeline: the upgrade is admitted by `AsrEndpoint.open_session` (same keys,
limits, meter and billing as `/v1/asr/stream`) and the session is our `AsrSessionRunner` with
its events handed here (`on_events`) instead of written as our JSON; codec.py translates both
ways. Deepgram's clients know no credit: the session runs with `overflow=block`, so audio sent
past the ingest bound pauses reading the socket (TCP back pressure) and memory per stream stays
what our own protocol's is.

A client slow to read its results: the runner stops stepping while the socket's write buffer
is above its high mark, and interim results are coalesced here meanwhile (only the newest is
kept; a final makes it stale), as our own outbox does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from server.compat.deepgram.codec import (
    BadClientMessage,
    ConfigureFailure,
    ConfigureSuccess,
    DialectError,
    ListenCodec,
    ListenError,
    listen_options,
)
from server.compat.deepgram.wire import DeepgramWire
from server.protocol.admission import Principal
from server.protocol.errors import Rejected, refuse
from server.sessions.asr_runner import AsrEndpoint, AsrSessionRunner
from server.sessions.upgrade import Admitted, SessionSocket, UpgradeRequest
from server.sessions.wire import Clock, Timer
from streamgate_protocol import messages as m

# How often a Finalize that ended no utterance is looked at again until it is answered.
FINALIZE_LOOK_S: Final = 0.05
class DeepgramListenEndpoint:
    kind = "asr"

    def __init__(self, asr: AsrEndpoint, clock: Clock | None = None) -> None:
        self.asr = asr
        self.clock = clock  # None: the running loop
    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        try:
            options = listen_options(upgrade.query, models=self.asr.models,
                                     default_model=self.asr.config.asr.session.default_model)
        except DialectError as exc:
            return refuse("bad_request", str(exc))
        ours = UpgradeRequest(path=upgrade.path, query=options.query, api_key=upgrade.api_key,
                              headers=upgrade.headers)
        decision = await self.asr.open_session(ours, principal)
        if isinstance(decision, Rejected):
            return decision
        open_session = decision.start

        def start(socket: SessionSocket) -> ListenSession:
            socket.error_frames = False  # the client takes Deepgram's messages only
            session = ListenSession(socket, ListenCodec(options), clock=self.clock,
                                    not_reading_s=self.asr.config.server.idle_timeout_s)
            session.runner = open_session(DeepgramWire(socket), on_events=session.on_events)
            return session

        return Admitted(start=start, cancel=decision.cancel)


class ListenSession:
    """The SessionHandler of one `/v1/listen` socket: Deepgram in, our runner behind."""

    __slots__ = ("_clock", "_held", "_not_reading", "_not_reading_s", "_timer", "codec",
                 "runner", "socket")

    def __init__(self, socket: SessionSocket, codec: ListenCodec, *, not_reading_s: float,
                 clock: Clock | None = None) -> None:
        """`clock`: the running loop, or a fake one in tests."""
        self.socket = socket
        self._clock: Clock = clock if clock is not None else asyncio.get_running_loop()
        self.codec = codec
        self.runner: AsrSessionRunner | None = None
        self._held: m.Transcript | None = None  # the newest interim, while the client lags
        self._timer: Timer | None = None  # looks for Finalizes to answer
        # A client that takes none of our results for this long is not reading: closed 1008.
        # (Our own protocol's outbox bound does this; with the runner's events handed here,
        # the runner stops stepping, reading pauses, and neither idle nor ping would tell.)
        self._not_reading_s = not_reading_s
        self._not_reading: Timer | None = None

    def _runner(self) -> AsrSessionRunner:
        assert self.runner is not None, "started before its runner"
        return self.runner

    # --- SessionHandler -------------------------------------------------------------------------

    def on_binary(self, data: bytes) -> None:
        self.codec.audio(data)
        self._runner().on_binary(data)

    def on_text(self, data: bytes) -> None:
        try:
            msg = self.codec.decode(data)
        except BadClientMessage as exc:
            # Deepgram's answer to a text frame it cannot parse; the stream goes on.
            error = ListenError(variant="SchemaError", description=f"bad message: {exc}"[:200],
                                message=data[:200].decode("utf-8", "replace"))
            self._send([m.encoder.encode(error)])
            return
        if isinstance(msg, (ConfigureSuccess, ConfigureFailure)):
            self._send([self.codec.encode_reply(msg)])
            return
        if isinstance(msg, (m.Finalize, m.Close)):  # a KeepAlive has done its work already:
            self._runner().control(msg)  # the connection saw activity

    def on_read_done(self) -> None:
        self._runner().on_read_done()
        self._answer_finalizes()

    def on_writable(self) -> None:
        if self._not_reading is not None:
            self._not_reading.cancel()
            self._not_reading = None
        held, self._held = self._held, None
        if held is not None:
            self._send(self.codec.encode(held))
        self._runner().on_writable()

    def on_idle(self) -> None:
        self._runner().on_idle()

    def on_drain(self) -> None:
        self._runner().on_drain()

    def on_connection_closed(self, code: int) -> None:
        self._held = None
        for timer in (self._timer, self._not_reading):
            if timer is not None:
                timer.cancel()
        self._timer = self._not_reading = None
        self._runner().on_connection_closed(code)

    # --- events ---------------------------------------------------------------------------------

    def on_events(self, events: list[m.AsrServerMessage]) -> None:
        codec = self.codec
        out: list[bytes] = []
        for ev in events:
            if type(ev) is m.Transcript:
                if not ev.is_final:
                    if self.socket.write_paused:
                        self._held = ev  # coalesced: only the newest interim matters
                        continue
                else:
                    self._held = None  # its final supersedes it
            out += codec.encode(ev)
        self._send(out)
        self._answer_finalizes()

    def _answer_finalizes(self) -> None:
        """Answer the Finalizes that ended no utterance once the session has read past them
        (codec.py); the session steps on its own time, so look again shortly while one waits."""
        codec, runner = self.codec, self.runner
        if runner is None or not codec.finalize_pending or runner.machine.state == "closed":
            return
        self._send(codec.answer_finalizes(runner.machine.accepted_ms))
        if codec.finalize_pending and self._timer is None:
            self._timer = self._later(FINALIZE_LOOK_S, self._look)

    def _look(self) -> None:
        self._timer = None
        self._answer_finalizes()

    def _send(self, payloads: list[bytes]) -> None:
        socket = self.socket
        sent = False
        for payload in payloads:
            socket.send_text(payload)
            sent = True
        if sent:
            socket.flush()
            if socket.write_paused and self._not_reading is None:
                self._not_reading = self._later(self._not_reading_s, self._client_not_reading)

    def _later(self, delay_s: float, callback: Callable[[], object]) -> Timer:
        clock = self._clock
        return clock.call_at(clock.time() + delay_s, callback)

    def _client_not_reading(self) -> None:
        """Closed from here: the runner would wait for the socket to drain before it closes.
        The session ends when the connection does (`on_connection_closed`)."""
        self._not_reading = None
        if self.socket.write_paused:
            error = ListenError(variant="client_not_reading",
                                description="client stopped reading results")
            self.socket.send_text(m.encoder.encode(error))
            self.socket.close(1008, "client_not_reading")
