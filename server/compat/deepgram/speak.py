"""Deepgram's streaming text-to-speech socket (`/v1/speak`) on our TTS sessions.

Admitted by `TtsEndpoint.open_session` (same keys, limits, meter and billing as
`/v1/tts/stream`) and run by our `TtsSessionRunner`, driven with typed commands (`SubmitText`,
`Flush`, `Interrupt`, `EndInput`); its events come here (`on_events`) and codec.py turns them
into Deepgram's messages. Audio frames go out as binary messages, as Deepgram's do.

Credit becomes TCP back pressure: Deepgram's clients grant none, so the bytes the socket took
are granted back to the session once the socket's write buffer is below its high mark (checked
on the next loop turn, and again when the socket drains). A client that stops reading stops the
grants, and is not read either while our writes wait (its text waits in its own socket): the
session holds at most its credit window and audio backlog, as for our own clients, and no
answer to text it could not take (a `Warning` per message) piles up behind unread audio. One
that takes nothing for `server.idle_timeout_s` is closed 1008 `client_not_reading`, as our own
ASR sessions close a client that stops reading its results.
"""

from __future__ import annotations

import asyncio

from server.compat.deepgram.codec import (
    BadClientMessage,
    DialectError,
    SpeakCodec,
    speak_options,
)
from server.compat.deepgram.wire import DeepgramWire
from server.protocol.admission import Principal
from server.protocol.errors import Rejected, refuse
from server.sessions.tts import Close as TtsClose
from server.sessions.tts import GrantCredit
from server.sessions.tts_runner import TtsEndpoint, TtsSessionRunner
from server.sessions.upgrade import Admitted, SessionSocket, UpgradeRequest
from streamgate_protocol import messages as m


class DeepgramSpeakEndpoint:
    kind = "tts"

    def __init__(self, tts: TtsEndpoint) -> None:
        self.tts = tts

    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        try:
            options = speak_options(upgrade.query, models=self.tts.engines.keys(),
                                    default_model=self.tts.config.tts.session.default_model)
        except DialectError as exc:
            return refuse("bad_request", str(exc))
        ours = UpgradeRequest(path=upgrade.path, query=options.query, api_key=upgrade.api_key,
                              headers=upgrade.headers)
        decision = await self.tts.open_session(ours, principal)
        if isinstance(decision, Rejected):
            return decision
        open_session = decision.start

        def start(socket: SessionSocket) -> SpeakSession:
            socket.error_frames = False  # the client takes Deepgram's messages only
            session = SpeakSession(socket, SpeakCodec(options),
                                   not_reading_s=self.tts.config.server.idle_timeout_s)
            wire = session.wire = DeepgramWire(socket, on_audio_sent=session.audio_sent)

            def peer_alive() -> None:
                # It takes our audio, though its pongs wait unread behind its text.
                socket.activity = True

            session.runner = open_session(wire, on_events=session.on_events,
                                          peer_alive=peer_alive)
            session.started()
            return session

        return Admitted(start=start, cancel=decision.cancel)


class SpeakSession:
    """The SessionHandler of one `/v1/speak` socket."""

    __slots__ = ("_gone", "_grant_due", "_not_reading", "_not_reading_s", "_owed", "codec",
                 "runner", "socket", "wire")

    def __init__(self, socket: SessionSocket, codec: SpeakCodec, *,
                 not_reading_s: float) -> None:
        self.socket = socket
        self.codec = codec
        self.runner: TtsSessionRunner | None = None
        self.wire: DeepgramWire | None = None
        # A client that takes nothing of what we sent for this long is not reading: closed
        # (while it is held, its socket is not read, so neither idle nor ping would tell).
        self._not_reading_s = not_reading_s
        self._not_reading: asyncio.TimerHandle | None = None
        self._owed = 0  # audio bytes the socket took, not yet granted back
        self._grant_due = False
        self._gone = False

    def _runner(self) -> TtsSessionRunner:
        assert self.runner is not None, "started before its runner"
        return self.runner

    def started(self) -> None:
        """The session is running: say what was asked for and not honoured (a Deepgram
        model name we do not serve, parameters we ignore), as Deepgram's `Warning`s."""
        options = self.codec.options
        notes: list[bytes | None] = []
        if options.asked_model and options.asked_model != options.model_name:
            notes.append(self.codec.warning(
                "model_not_served", f"model {options.asked_model[:64]!r} is not served here; "
                f"speaking with {options.model_name!r}"))
        if options.ignored:
            notes.append(self.codec.warning(
                "parameters_ignored", f"ignored: {', '.join(options.ignored)}"))
        self._send(notes)

    # --- credit as TCP back pressure --------------------------------------------------------

    def audio_sent(self, n: int) -> None:
        self._owed += n
        if not self._grant_due:
            self._grant_due = True
            # Not from inside the runner's pump that sent it: the grant pumps again.
            asyncio.get_running_loop().call_soon(self._grant)

    def _grant(self) -> None:
        """After the runner's pump flushed what it sent (the write buffer's level is known)."""
        self._grant_due = False
        if self._gone or not self._owed:
            return
        if self.socket.write_paused:
            self._hold_while_not_written()
            return  # on_writable grants what is owed once the socket drains
        owed, self._owed = self._owed, 0
        self._runner().handle(GrantCredit(owed))

    # --- SessionHandler -------------------------------------------------------------------------

    def on_text(self, data: bytes) -> None:
        try:
            command = self.codec.decode(data)
        except BadClientMessage as exc:
            self._send([self.codec.warning("bad_message", f"bad message: {exc}")])
            return
        if command is not None:  # a KeepAlive has done its work: the connection saw activity
            self._runner().handle(command)

    def on_binary(self, data: bytes) -> None:
        self._runner().on_binary(data)  # answered with a Warning: this socket takes text

    def on_read_done(self) -> None:
        self._runner().on_read_done()

    def on_writable(self) -> None:
        if self.wire is not None:
            self.wire.written()
        if self._not_reading is not None:
            self._not_reading.cancel()
            self._not_reading = None
        self._grant()
        self._runner().on_writable()

    def on_idle(self) -> None:
        self._runner().on_idle()

    def on_drain(self) -> None:
        self._runner().on_drain()

    def on_connection_closed(self, code: int) -> None:
        self._gone = True
        if self._not_reading is not None:
            self._not_reading.cancel()
            self._not_reading = None
        self._runner().on_connection_closed(code)

    # --- events ---------------------------------------------------------------------------------

    def on_events(self, events: list[m.TtsServerMessage]) -> None:
        codec = self.codec
        self._send([codec.encode(ev) for ev in events])

    def _send(self, payloads: list[bytes | None]) -> None:
        socket = self.socket
        sent = False
        for payload in payloads:
            if payload is not None:
                socket.send_text(payload)
                sent = True
        if sent:
            socket.flush()
            self._hold_while_not_written()

    def _hold_while_not_written(self) -> None:
        wire = self.wire
        if wire is None or self._gone:
            return
        wire.hold_while_not_written()
        if wire.held and self._not_reading is None:
            self._not_reading = asyncio.get_running_loop().call_later(
                self._not_reading_s, self._client_not_reading)

    def _client_not_reading(self) -> None:
        self._not_reading = None
        if self.wire is not None and self.wire.held and not self._gone:
            self._runner().handle(TtsClose(1008, "client_not_reading",
                                           "client stopped reading audio"))
