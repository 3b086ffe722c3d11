"""Locust users speaking streamgate's WebSocket protocols (docs/protocol.md).

    locust -f loadtest/locustfile.py --headless -u 200 -r 50 -t 30s --host ws://127.0.0.1:8765

Users (weights from the environment, see below):
- AsrUser streams audio to /v1/asr/stream at real-time pace, never beyond its credit, then
  `close` -> `summary` -> close 1000.
- TtsUser sends reply text + `flush` to /v1/tts/stream, plays the audio out at real time and
  returns credit as it plays, for a few turns, then closes.
- TwilioUser places a Twilio Media Streams call on /v1/telephony/twilio: connected, start (key
  in customParameters), media every 20 ms for the whole call (caller speech, then silence while
  the agent answers; marks echoed once the audio before them has played), stop.

What shows in locust's stats (request type "WS"; times in ms of wall time on this machine):
- "asr time to first transcript": first audio frame sent -> first `transcript` (interim or final).
- "asr final latency after end of speech": the send time of the frame carrying audio time
  `end_ms` -> that utterance's final `transcript` (so it includes `endpointing_ms` of silence;
  finals flushed by `close` are left out).
- "asr session", "tts session", "twilio call": connect -> the close (a success only for a
  `summary` + close 1000, or for Twilio a close 1000 after `stop`); failures are named by close
  code and error code ("close 4008 idle_timeout") or HTTP status ("HTTP 429 rate_limited").
- "tts time to first audio": `flush` sent -> the first binary frame after it.
- "twilio time to first agent audio": the caller's last speech frame sent -> the first agent
  `media` (endpointing, ASR, the agent and TTS together).

Environment: STREAMGATE_API_KEY (else the dev key `streamgate serve` saved in
.streamgate/dev-api-key, for a local server); LOADTEST_ASR_WEIGHT / LOADTEST_TTS_WEIGHT /
LOADTEST_TWILIO_WEIGHT (3/2/1; 0 leaves a user out; Twilio is left out by itself if the server
answers 404 on its path); LOADTEST_ASR_MODEL / LOADTEST_TTS_MODEL ("synthetic"; "" for the
server's default); LOADTEST_AUDIO ("speech": a synthetic speech-like loop, or a WAV path);
LOADTEST_ENCODING / LOADTEST_SAMPLE_RATE / LOADTEST_CHUNK_MS (ASR: pcm_s16le, 16000, 20);
LOADTEST_UTTERANCES (ASR audio loops per session, 3); LOADTEST_TURNS (TTS and Twilio, 2).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

import gevent
import websocket  # websocket-client, a locust dependency: blocking, so fine on gevent sockets
from gevent.event import Event
from locust import User, between, events, task
from locust.env import Environment

from loadtest.loadgen import speech_pcm
from loadtest.swarm import chunks, encode_pcm, prepare_audio
from streamgate_client.asr_client import API_KEY_ENV, dev_key

ASR_PATH, TTS_PATH, TWILIO_PATH = "/v1/asr/stream", "/v1/tts/stream", "/v1/telephony/twilio"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0  # a session that hears nothing for this long has failed
CLOSE_TIMEOUT_S = 15.0  # `close` -> the close frame (the server waits up to 10 s for finals)


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


ASR_MODEL = env("LOADTEST_ASR_MODEL", "synthetic")
TTS_MODEL = env("LOADTEST_TTS_MODEL", "synthetic")
ENCODING, RATE = env("LOADTEST_ENCODING", "pcm_s16le"), int(env("LOADTEST_SAMPLE_RATE", "16000"))
CHUNK_MS = int(env("LOADTEST_CHUNK_MS", "20"))
UTTERANCES, TURNS = int(env("LOADTEST_UTTERANCES", "3")), int(env("LOADTEST_TURNS", "2"))
TEXTS = ["Hello, thanks for calling. How can I help you today?",
         "Sure. Your order shipped yesterday and should arrive on Friday."]

# Prepared once per process: every user shares the same bytes.
_frame_bytes = RATE * (2 if ENCODING == "pcm_s16le" else 1) * CHUNK_MS // 1000
ASR_FRAMES = chunks(prepare_audio(env("LOADTEST_AUDIO", "speech"), ENCODING, RATE), _frame_bytes)
# The caller's turn on a call: the voiced 1.6 s of the synthetic loop, mu-law 8 kHz, 20 ms.
CALLER_FRAMES = chunks(encode_pcm(speech_pcm(pause_s=0.0), "mulaw"), 160)
SILENCE = b"\xff" * 160  # mu-law zero: a phone line keeps sending while the caller listens


def api_key(host: str) -> str | None:
    return os.environ.get(API_KEY_ENV) or dev_key(host)


class SessionError(Exception):
    """Why a session failed, worded to group well in locust's failure table."""


class Conn:
    """One WebSocket: the user's greenlet sends, a reader greenlet hands messages to callbacks."""

    def __init__(self, url: str, headers: list[str], on_text: Callable[[dict[str, Any]], None],
                 on_binary: Callable[[bytes], None] | None = None) -> None:
        try:
            self.ws = websocket.create_connection(
                url, header=headers, timeout=CONNECT_TIMEOUT_S, enable_multithread=True,
                skip_utf8_validation=True)
        except websocket.WebSocketBadStatusException as exc:
            code = ""
            try:
                code = json.loads(exc.resp_body or b"{}")["error"]["code"]
            except (ValueError, KeyError, TypeError):
                pass
            raise SessionError(f"HTTP {exc.status_code} {code}".strip()) from None
        except (OSError, websocket.WebSocketException) as exc:
            raise SessionError(f"connect: {type(exc).__name__}") from None
        self.ws.settimeout(READ_TIMEOUT_S)
        self.on_text, self.on_binary = on_text, on_binary
        self.close_code: int | None = None
        self.error_code = ""  # the last `error` message's code: the reason a close gives
        self.done = Event()
        self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        try:
            while True:
                op, data = self.ws.recv_data()
                if op == websocket.ABNF.OPCODE_TEXT:
                    msg = json.loads(data)
                    if msg.get("type") == "error":
                        self.error_code = str(msg.get("code"))
                    self.on_text(msg)
                elif op == websocket.ABNF.OPCODE_BINARY and self.on_binary is not None:
                    self.on_binary(data)
                elif op == websocket.ABNF.OPCODE_CLOSE:
                    self.close_code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                    return
        except websocket.WebSocketTimeoutException:
            self.error_code = "read timeout"
        except (OSError, ValueError, websocket.WebSocketException):
            pass  # lost without a close frame: close_code stays None (1006)
        finally:
            self.done.set()
            self.ws.shutdown()  # type: ignore[no-untyped-call]  # (websocket-client)

    def send(self, payload: str | bytes) -> bool:
        if self.done.is_set():
            return False
        try:
            if isinstance(payload, bytes):
                self.ws.send_binary(payload)
            else:
                self.ws.send(payload)
        except (OSError, websocket.WebSocketException):
            return False
        return True

    def wait_closed(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        if not self.done.wait(timeout):
            self.error_code = "close timeout"
            self.ws.shutdown()  # type: ignore[no-untyped-call]  # (websocket-client)
            self.done.wait(2.0)

    def failure(self) -> SessionError:
        return SessionError(f"close {self.close_code or 1006} {self.error_code}".strip())


class StreamgateUser(User):
    abstract = True
    wait_time = between(0.5, 1.5)
    conn: Conn | None = None

    def on_stop(self) -> None:
        # The test ended mid-session: drop the socket now rather than leave the server a
        # half-open session (and its reader greenlet) until the idle timeout.
        if self.conn is not None and not self.conn.done.is_set():
            self.conn.ws.shutdown()  # type: ignore[no-untyped-call]

    def send(self, payload: str | bytes) -> bool:
        return self.conn is not None and self.conn.send(payload)

    def fire(self, name: str, seconds: float, length: int = 0,
             exc: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="WS", name=name, response_time=seconds * 1000.0,
            response_length=length, response=None, context={}, exception=exc)

    def url(self, path: str, params: dict[str, str]) -> str:
        if not self.host:
            raise SessionError("no host: run locust with --host ws://127.0.0.1:8765")
        query = {k: v for k, v in params.items() if v}
        return self.host.rstrip("/") + path + (f"?{urlencode(query)}" if query else "")

    def auth(self) -> list[str]:
        key = api_key(self.host or "")
        return [f"Authorization: Bearer {key}"] if key else []


class AsrUser(StreamgateUser):
    weight = int(env("LOADTEST_ASR_WEIGHT", "3"))

    @task
    def stream(self) -> None:
        self.credit, self.granted = 0, Event()
        self.t0: float | None = None  # first frame sent: audio time 0
        self.sent: list[float] = []  # send time of every frame
        self.got_transcript = self.summary = self.closing = False
        url = self.url(ASR_PATH, {"model": ASR_MODEL, "encoding": ENCODING,
                                  "sample_rate": str(RATE)})
        t_connect = time.perf_counter()
        try:
            conn = self.conn = Conn(url, self.auth(), self.on_text)
        except SessionError as exc:
            self.fire("asr session", time.perf_counter() - t_connect, exc=exc)
            return
        n = UTTERANCES * len(ASR_FRAMES)
        start = time.perf_counter()
        for i in range(n):  # real time: frame i is due at start + i chunks, whatever the wait
            gevent.sleep(max(0.0, start + i * CHUNK_MS / 1000.0 - time.perf_counter()))
            frame = ASR_FRAMES[i % len(ASR_FRAMES)]
            while self.credit < len(frame) and not conn.done.is_set():
                self.granted.clear()
                if self.credit < len(frame) and not self.granted.wait(4.0):
                    conn.send('{"type":"keepalive"}')  # no credit for a while: stay clear of 4008
            self.credit -= len(frame)
            now = time.perf_counter()
            if not conn.send(frame):
                break
            self.t0 = self.t0 or now
            self.sent.append(now)
        self.closing = True
        conn.send('{"type":"close"}')
        conn.wait_closed()
        ok = conn.close_code == 1000 and self.summary
        self.fire("asr session", time.perf_counter() - t_connect, len(self.sent) * _frame_bytes,
                  None if ok else conn.failure())

    def on_text(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind in ("ready", "credit"):
            self.credit += int(msg["credit_bytes" if kind == "ready" else "bytes"])
            self.granted.set()
        elif kind == "transcript" and self.t0 is not None:
            now = time.perf_counter()
            if not self.got_transcript:
                self.got_transcript = True
                self.fire("asr time to first transcript", now - self.t0)
            if msg.get("is_final") and not self.closing:  # `close` flushes skip endpointing
                k = max(0, -(-int(msg["end_ms"]) // CHUNK_MS) - 1)  # the frame carrying end_ms
                if k < len(self.sent):
                    self.fire("asr final latency after end of speech", now - self.sent[k],
                              len(str(msg.get("text", ""))))
        elif kind == "summary":
            self.summary = True


class TtsUser(StreamgateUser):
    weight = int(env("LOADTEST_TTS_WEIGHT", "2"))

    @task
    def speak(self) -> None:
        self.ready, self.flushed = Event(), Event()
        self.bytes_per_s, self.play_end, self.received = 16000.0, 0.0, 0
        self.flush_at: float | None = None
        self.summary = False
        url = self.url(TTS_PATH, {"model": TTS_MODEL, "encoding": "pcm_s16le",
                                  "sample_rate": "16000"})
        t_connect = time.perf_counter()
        try:
            conn = self.conn = Conn(url, self.auth(), self.on_text, self.on_audio)
        except SessionError as exc:
            self.fire("tts session", time.perf_counter() - t_connect, exc=exc)
            return
        self.ready.wait(CONNECT_TIMEOUT_S)
        for turn in range(TURNS):
            self.flushed.clear()
            conn.send(json.dumps({"type": "text", "text": TEXTS[turn % len(TEXTS)]}))
            self.flush_at = time.perf_counter()
            if not conn.send('{"type":"flush"}') or not self.flushed.wait(READ_TIMEOUT_S):
                break
            gevent.sleep(max(0.0, self.play_end - time.perf_counter()) + 1.0)  # listen, pause
        conn.send('{"type":"close"}')
        conn.wait_closed()
        ok = conn.close_code == 1000 and self.summary
        self.fire("tts session", time.perf_counter() - t_connect, self.received,
                  None if ok else conn.failure())

    def on_text(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "ready":
            audio = msg.get("audio") or {}
            width = 2 if audio.get("encoding") == "pcm_s16le" else 1
            self.bytes_per_s = float(audio.get("sample_rate", 16000)) * width
            self.ready.set()
        elif kind == "flushed":
            self.flushed.set()
        elif kind == "summary":
            self.summary = True

    def on_audio(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.flush_at is not None:
            self.fire("tts time to first audio", now - self.flush_at)
            self.flush_at = None
        self.received += len(data)
        # Played out at real time; the credit returns the bytes once they have played.
        self.play_end = max(self.play_end, now) + len(data) / self.bytes_per_s
        gevent.spawn_later(self.play_end - now, self.send,
                           json.dumps({"type": "credit", "bytes": len(data)}))


class TwilioUser(StreamgateUser):
    weight = int(env("LOADTEST_TWILIO_WEIGHT", "1"))

    @task
    def call(self) -> None:
        self.sid, self.call_sid = "MZ" + uuid.uuid4().hex, "CA" + uuid.uuid4().hex
        self.play: deque[bytes | str] = deque()  # agent audio and marks, in order
        self.changed, self.cleared = Event(), Event()
        self.speech_end: float | None = None  # waiting for the agent's first audio since then
        self.last_agent = 0.0
        t_connect = time.perf_counter()
        try:  # no headers: the key travels in the start event, as Twilio would send it
            conn = self.conn = Conn(self.url(TWILIO_PATH, {}), [], self.on_text)
        except SessionError as exc:
            self.fire("twilio call", time.perf_counter() - t_connect, exc=exc)
            return
        player = gevent.spawn(self.player)
        conn.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        conn.send(self.msg("start", {
            "streamSid": self.sid, "callSid": self.call_sid, "tracks": ["inbound"],
            "customParameters": {"api_key": api_key(self.host or "") or ""},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}))
        self.seq, self.t_start = 0, time.perf_counter()  # (User.start is locust's)
        for _ in range(TURNS):
            for frame in CALLER_FRAMES:
                self.media(frame)
            self.speech_end = self.last_sent
            # Listen (sending silence) until the reply has played and the line is quiet.
            deadline = time.perf_counter() + 10.0
            while time.perf_counter() < deadline and not conn.done.is_set() and (
                    self.speech_end is not None or self.play
                    or time.perf_counter() - self.last_agent < 0.6):
                self.media(SILENCE)
        conn.send(self.msg("stop", {"accountSid": "AC0", "callSid": self.call_sid}))
        conn.wait_closed()
        player.kill()
        ok = conn.close_code == 1000
        self.fire("twilio call", time.perf_counter() - t_connect, self.seq * 160,
                  None if ok else conn.failure())

    def msg(self, event: str, body: dict[str, Any]) -> str:
        return json.dumps({"event": event, "streamSid": self.sid, event: body})

    def media(self, frame: bytes) -> None:
        """One 20 ms media message, on the call's real-time schedule."""
        gevent.sleep(max(0.0, self.t_start + self.seq * 0.02 - time.perf_counter()))
        self.seq += 1
        self.send(self.msg("media", {
            "track": "inbound", "chunk": str(self.seq), "timestamp": str(self.seq * 20),
            "payload": base64.b64encode(frame).decode()}))
        self.last_sent = time.perf_counter()

    def on_text(self, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        if event == "media":
            now = self.last_agent = time.perf_counter()
            if self.speech_end is not None:
                self.fire("twilio time to first agent audio", now - self.speech_end)
                self.speech_end = None
            self.play.append(base64.b64decode(msg["media"]["payload"]))
        elif event == "mark":
            self.play.append(str(msg["mark"]["name"]))
        elif event == "clear":  # barge-in: drop what has not played, echo its marks at once
            names = [m for m in self.play if isinstance(m, str)]
            self.play.clear()
            for name in names:
                self.send(self.msg("mark", {"name": name}))
            self.cleared.set()
        self.changed.set()

    def player(self) -> None:
        """Plays agent audio at real time and echoes each mark once the audio before it has."""
        while True:
            if not self.play:
                self.changed.clear()
                self.changed.wait(1.0)
                continue
            item = self.play.popleft()
            if isinstance(item, str):
                self.send(self.msg("mark", {"name": item}))
            else:
                self.cleared.clear()
                self.cleared.wait(len(item) / 8000.0)


def twilio_answers(host: str) -> bool:
    """False only if the server answers the Twilio path's upgrade with 404 (not wired yet)."""
    u = urlsplit(host)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), 5.0) as s:
            s.sendall(f"GET {TWILIO_PATH} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n".encode())
            return s.recv(64).split(b" ")[1:2] != [b"404"]
    except OSError:
        return True  # unreachable: let the users report it


@events.init.add_listener  # type: ignore[untyped-decorator]  # (locust's)
def _drop_twilio_if_unwired(environment: Environment, **_: Any) -> None:
    users = environment.user_classes
    if TwilioUser in users and len(users) > 1 and environment.host \
            and not twilio_answers(environment.host):
        users.remove(TwilioUser)  # the runner builds its user mix from this list at start
        print(f"locustfile: {TWILIO_PATH} answers 404 on {environment.host}: "
              "running AsrUser and TtsUser only")
