"""Sarvam's streaming WebSockets on our sessions: `/speech-to-text/ws` and `/text-to-speech/ws`,
the paths the `sarvamai` SDK appends to its environment's `production` URL.

Each endpoint is admission (the key from Sarvam's `api-subscription-key` header, or ours at the
upgrade), the session kernel's own `open_session` (leases, limits, metering), and a thin
handler that runs the codec (stt_codec.py, tts_codec.py) between the socket and the session.
Sarvam's clients know no credit: the ASR session's ingest queue pauses reading when full (its
`block` overflow), and TTS credit is granted as the socket takes the audio, so a client that
stops reading stops the synthesis (TCP back pressure). docs/compat.md, "Sarvam".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from server.compat.sarvam import stt_codec, tts_codec
from server.compat.sarvam.stt_codec import AudioIn, FlushIn, SttCodec
from server.compat.sarvam.tts_codec import BadConfig, TtsCodec
from server.protocol.admission import AdmissionPolicy, Authenticator, Principal
from server.protocol.errors import Rejected, refuse
from server.sessions.asr_params import MAX_RATE, MIN_RATE
from server.sessions.asr_runner import AsrEndpoint, AsrSessionRunner
from server.sessions.tts import Close, GrantCredit
from server.sessions.tts_runner import TtsEndpoint, TtsSessionRunner
from server.sessions.upgrade import Admitted, SessionSocket, UpgradeRequest
from streamgate_protocol import messages as m

log = logging.getLogger("streamgate.sarvam")
Spawn = Callable[[Coroutine[Any, Any, None]], object]  # SessionHost.spawn: a tracked task

STT_PATH = "/speech-to-text/ws"
TTS_PATH = "/text-to-speech/ws"
KEY_HEADER = "api-subscription-key"
# Sarvam's model families: served by our default model of the kind (docs/compat.md).
STT_MODEL_PREFIXES = ("saaras:", "saarika:")
TTS_MODEL_PREFIXES = ("bulbul:",)
INPUT_CODECS = ("wav", "pcm_s16le", "pcm_l16", "pcm_raw")
_TRUE = ("true", "1")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict (tests); websockets' Headers is case-insensitive itself
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


class SubscriptionKeys:
    """Sarvam's `api-subscription-key` header, checked as the router checks our own key: the
    same authenticator and per-key admission policy, the same refusals."""

    def __init__(self, authenticator: Authenticator, policy: AdmissionPolicy | None) -> None:
        self.authenticator = authenticator
        self.policy = policy

    async def principal(self, upgrade: UpgradeRequest) -> Principal | Rejected:
        key = (_header(upgrade.headers, KEY_HEADER) or "").strip()
        if not key:
            return refuse("unauthorized", f"missing API key: send the {KEY_HEADER} header")
        try:
            principal = await self.authenticator.authenticate(key)
        except Exception:
            log.exception("authentication backend failed")
            return refuse("auth_unavailable", "cannot check API keys right now; retry")
        if principal is None:
            return refuse("unauthorized", "missing or invalid API key")
        if self.policy is not None:
            refused = await self.policy.check_upgrade(principal)
            if refused is not None:
                return refused
        return principal


def _model(asked: str | None, ours: Mapping[str, object], default: str,
           families: tuple[str, ...]) -> str | Rejected:
    if asked is None or asked.startswith(families):
        return default
    if asked in ours:
        return asked
    return refuse("bad_request", f"unknown model {asked[:40]!r}; available: "
                  f"{', '.join(sorted(ours))} (or Sarvam's, served by {default})")


# --- speech to text -------------------------------------------------------------------------------


class SarvamSttEndpoint:
    kind = "asr"

    def __init__(self, *, asr: AsrEndpoint, keys: SubscriptionKeys) -> None:
        self.asr = asr
        self.keys = keys

    async def admit_without_key(self, upgrade: UpgradeRequest) -> Admitted | Rejected:
        principal = await self.keys.principal(upgrade)
        if isinstance(principal, Rejected):
            return principal
        return await self.admit(upgrade, principal)

    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        query = upgrade.query
        settings = self.asr.config.asr.session
        model = _model(query.get("model"), self.asr.engines, settings.default_model,
                       STT_MODEL_PREFIXES)
        if isinstance(model, Rejected):
            return model
        codec_name = query.get("input_audio_codec", "wav")
        if codec_name not in INPUT_CODECS:
            return refuse("bad_request", f"input_audio_codec must be one of "
                          f"{', '.join(INPUT_CODECS)}")
        rate: int | None = None
        if "sample_rate" in query:
            try:
                rate = int(query["sample_rate"])
            except ValueError:
                return refuse("bad_request", "sample_rate must be an integer")
            if not MIN_RATE <= rate <= MAX_RATE:
                return refuse("bad_request", f"sample_rate must be {MIN_RATE}-{MAX_RATE}")
        language = query.get("language-code") or query.get("language_code")
        if language == "unknown":
            language = None
        ours = {"model": model, "encoding": "pcm_s16le",
                "sample_rate": str(rate or stt_codec.DEFAULT_RATE), "interim_results": "false"}
        if language:
            ours["language"] = language
        if query.get("high_vad_sensitivity", "").lower() in _TRUE:
            ours["vad"] = "high"
        decision = await self.asr.open_session(
            UpgradeRequest(path=upgrade.path, query=ours, api_key=None), principal)
        if isinstance(decision, Rejected):
            return decision
        codec = SttCodec(connection_rate=rate, language=language,
                         vad_signals=query.get("vad_signals", "").lower() in _TRUE)
        session_rate = rate or stt_codec.DEFAULT_RATE
        admission = decision

        def start(socket: SessionSocket) -> SarvamSttSession:
            socket.error_frames = False  # Sarvam's clients parse Sarvam's messages only
            session = SarvamSttSession(socket, codec, session_rate)
            session.runner = admission.start(session.wire, session.on_events)
            return session

        return Admitted(start=start, cancel=decision.cancel)


class ReadPausingWire:
    """The socket as the ASR runner sees it, remembering whether the runner paused reading:
    a client we stopped reading is held back by us, not idle."""

    def __init__(self, socket: SessionSocket) -> None:
        self.socket = socket
        self.reading_paused = False

    @property
    def write_paused(self) -> bool:
        return self.socket.write_paused

    def send_text(self, data: bytes) -> None:
        self.socket.send_text(data)

    def send_binary(self, data: bytes) -> None:
        self.socket.send_binary(data)

    def flush(self) -> None:
        self.socket.flush()

    def close(self, code: int, reason: str = "") -> None:
        self.socket.close(code, reason)

    def pause_reading(self) -> None:
        self.reading_paused = True
        self.socket.pause_reading()

    def resume_reading(self) -> None:
        self.reading_paused = False
        self.socket.resume_reading()


class SarvamSttSession:
    """The SessionHandler: Sarvam messages in, our session's commands; its events out as
    Sarvam's. The runner is ours, unchanged; it gets PCM as if sent in binary frames."""

    def __init__(self, socket: SessionSocket, codec: SttCodec, session_rate: int) -> None:
        self.socket = socket
        self.wire = ReadPausingWire(socket)
        self.codec = codec
        self.runner: AsrSessionRunner | None = None
        self._session_rate = session_rate
        self._audio_seen = False
        self._clock = time.monotonic
        self._wall = time.time

    def on_text(self, data: bytes) -> None:
        runner = self.runner
        assert runner is not None
        got = self.codec.decode(data, self._clock())
        if isinstance(got, AudioIn):
            if not self._audio_seen:
                self._audio_seen = True
                if got.sample_rate != self._session_rate:
                    # The first audio tells the rate (a WAV header): the session takes a
                    # config before its first audio.
                    runner.control(m.Config(sample_rate=got.sample_rate))
            if got.pcm:
                runner.on_binary(got.pcm)
        elif isinstance(got, FlushIn):
            runner.control(m.Finalize())
        elif isinstance(got, stt_codec.Refused):
            self._send(stt_codec.error_message(got.code, got.message))

    def on_binary(self, data: bytes) -> None:
        self._send(stt_codec.error_message(
            "bad_message", "send audio as JSON: {\"audio\": {\"data\": <base64>, ...}}"))

    def on_events(self, events: list[m.AsrServerMessage]) -> None:
        now, wall = self._clock(), self._wall()
        sent = False
        for event in events:
            for out in self.codec.encode(event, now, wall):
                self.socket.send_text(out)
                sent = True
        if sent:
            self.socket.flush()

    def _send(self, data: bytes) -> None:
        self.socket.send_text(data)
        self.socket.flush()

    # The rest is the runner's.
    def on_read_done(self) -> None:
        if self.runner is not None:
            self.runner.on_read_done()

    def on_writable(self) -> None:
        if self.runner is not None:
            self.runner.on_writable()

    def on_idle(self) -> None:
        # Not while we hold the client back (a slow engine filled the ingest queue: its audio
        # waits in its socket, unread by us), nor while it waits for the final of speech it
        # sent: Sarvam's protocol has no `close` that would tell us it is done sending.
        if self.runner is not None and not self.wire.reading_paused \
                and not self.codec.speaking:
            self.runner.on_idle()

    def on_drain(self) -> None:
        if self.runner is not None:
            self.runner.on_drain()

    def on_connection_closed(self, code: int) -> None:
        if self.runner is not None:
            self.runner.on_connection_closed(code)


# --- text to speech -------------------------------------------------------------------------------


class SarvamTtsEndpoint:
    kind = "tts"

    def __init__(self, *, tts: TtsEndpoint, keys: SubscriptionKeys) -> None:
        self.tts = tts
        self.keys = keys

    async def admit_without_key(self, upgrade: UpgradeRequest) -> Admitted | Rejected:
        principal = await self.keys.principal(upgrade)
        if isinstance(principal, Rejected):
            return principal
        return await self.admit(upgrade, principal)

    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        query = upgrade.query
        model = _model(query.get("model"), self.tts.engines,
                       self.tts.config.tts.session.default_model, TTS_MODEL_PREFIXES)
        if isinstance(model, Rejected):
            return model
        # Until a config says otherwise: Sarvam's defaults (MP3 made from PCM16 at 22050 Hz).
        ours = {"model": model, "encoding": "pcm_s16le",
                "sample_rate": str(tts_codec.DEFAULT_RATE)}
        decision = await self.tts.open_session(
            UpgradeRequest(path=upgrade.path, query=ours, api_key=None), principal)
        if isinstance(decision, Rejected):
            return decision
        codec = TtsCodec(
            completion_events=query.get("send_completion_event", "true").lower() in _TRUE,
            language=None)
        admission = decision

        def start(socket: SessionSocket) -> SarvamTtsSession:
            socket.error_frames = False
            session = SarvamTtsSession(socket, codec, self.tts.server.spawn)

            def peer_alive() -> None:
                socket.activity = True  # it takes our audio though its pongs wait unread

            session.runner = admission.start(session.wire, on_events=None,
                                             peer_alive=peer_alive)
            return session

        return Admitted(start=start, cancel=decision.cancel)


@dataclass(frozen=True, slots=True)
class _CloseAfter:
    """The runner's close, queued behind the audio still being encoded."""

    code: int
    reason: str


# What waits, in order, while MP3 or Opus frames are encoded off the event loop.
_Pending = bytes | m.TtsServerMessage | _CloseAfter


class SarvamTtsWire:
    """The wire the TTS runner writes to: our audio frames and events in, in their order,
    Sarvam's messages out. Events come as our JSON (the runner's `on_events` would hand them
    over after the audio of the same step, losing their place among the frames, which the
    `final` event and the end of a chunk's MP3 depend on).

    MP3 and Opus cost milliseconds a frame (14-47x real time, docs/decisions/14F1-*.md), so
    those frames are encoded in a worker thread, one at a time; whatever the runner sends
    meanwhile waits behind them in `_pending`, whose size the session's credit bounds (a frame
    counts as sent, and its credit is granted, only once its message is on the socket)."""

    def __init__(self, socket: SessionSocket, codec: TtsCodec,
                 audio_sent: Callable[[int], None], spawn: Spawn) -> None:
        self.socket = socket
        self.codec = codec
        self._audio_sent = audio_sent
        self._spawn = spawn
        self._pending: deque[_Pending] = deque()
        self._encoding = False  # the task that works through `_pending` runs
        self._closed = False

    @property
    def write_paused(self) -> bool:
        return self.socket.write_paused

    def send_binary(self, data: bytes) -> None:
        if self.codec.compressed or self._pending:
            self._queue(data)
            return
        out = self.codec.audio(data)
        if out is not None:
            self.socket.send_text(out)
        self._audio_sent(len(data))

    def send_text(self, data: bytes) -> None:
        event = m.tts_server_decoder.decode(data)
        if self._pending:
            self._queue(event)
            return
        for out in self.codec.event(event):
            self.socket.send_text(out)

    def flush(self) -> None:
        if not self._pending:
            self.socket.flush()  # else the encoding task flushes what it sends

    def close(self, code: int, reason: str = "") -> None:
        if self._pending:
            self._queue(_CloseAfter(code, reason))
        else:
            self.socket.close(code, reason)

    def pause_reading(self) -> None:
        self.socket.pause_reading()

    def resume_reading(self) -> None:
        self.socket.resume_reading()

    def connection_closed(self) -> None:
        self._closed = True
        self._pending.clear()
        self.codec.close()

    def _queue(self, item: _Pending) -> None:
        if self._closed:
            return
        self._pending.append(item)
        if not self._encoding:
            self._encoding = True
            self._spawn(self._work())

    async def _work(self) -> None:
        pending, socket, codec = self._pending, self.socket, self.codec
        try:
            while pending and not self._closed:
                item = pending[0]  # stays queued while it is worked on: what comes waits
                if isinstance(item, bytes):
                    data = await asyncio.to_thread(codec.encode_frame, item)
                    if self._closed:
                        return
                    out = codec.audio_message(data)
                    if out is not None:
                        socket.send_text(out)
                    self._audio_sent(len(item))
                elif isinstance(item, _CloseAfter):
                    socket.close(item.code, item.reason)
                else:
                    for out in codec.event(item):
                        socket.send_text(out)
                pending.popleft()
                if not pending or isinstance(pending[0], bytes):
                    socket.flush()
        finally:
            self._encoding = False


class SarvamTtsSession:
    """The SessionHandler of a Sarvam TTS socket. Credit is granted for the audio the socket
    has taken: right after a send while the socket is not write-paused, else when it drains
    (`on_writable`); granted from a callback of its own, never inside the runner's send."""

    def __init__(self, socket: SessionSocket, codec: TtsCodec, spawn: Spawn) -> None:
        self.socket = socket
        self.codec = codec
        self.wire = SarvamTtsWire(socket, codec, self._audio_sent, spawn)
        self.runner: TtsSessionRunner | None = None
        self._owed = 0
        self._grant_scheduled = False
        self._closed = False

    def _audio_sent(self, size: int) -> None:
        self._owed += size
        if not self._grant_scheduled:
            self._grant_scheduled = True
            asyncio.get_running_loop().call_soon(self._grant)

    def _grant(self) -> None:
        self._grant_scheduled = False
        if self._closed or not self._owed or self.runner is None or self.socket.write_paused:
            return  # on_writable grants it once the socket drains
        owed, self._owed = self._owed, 0
        self.runner.handle(GrantCredit(owed))

    def on_text(self, data: bytes) -> None:
        runner = self.runner
        assert runner is not None
        got = self.codec.decode(data)
        if isinstance(got, tts_codec.Refused):
            self._send(tts_codec.error_message(got.code, got.message,
                                               request_id=self.codec.request_id))
        elif isinstance(got, BadConfig):
            runner.handle(Close(4400, "bad_config", got.message))
        elif got is not None:
            runner.handle(got)

    def on_binary(self, data: bytes) -> None:
        self._send(tts_codec.error_message("bad_message", "a TTS socket takes JSON messages",
                                           request_id=self.codec.request_id))

    def _send(self, data: bytes) -> None:
        self.socket.send_text(data)
        self.socket.flush()

    def on_read_done(self) -> None:
        pass  # each message was handled as it came

    def on_writable(self) -> None:
        self._grant()
        if self.runner is not None:
            self.runner.on_writable()

    def on_idle(self) -> None:
        if self.runner is not None:
            self.runner.on_idle()

    def on_drain(self) -> None:
        if self.runner is not None:
            self.runner.on_drain()

    def on_connection_closed(self, code: int) -> None:
        self._closed = True
        self.wire.connection_closed()
        if self.runner is not None:
            self.runner.on_connection_closed(code)
