"""Load generator: N WebSocket connections on raw asyncio Protocols (uvloop), frames built by hand.

The client side of RFC 6455 is small enough to hand-build: the 160-byte audio frame (20 ms of
8 kHz mu-law) is masked once at import and every send writes the same bytes object. Server
frames are parsed only as far as needed (opcode, length); a text payload is decoded as JSON only
when it is not an acknowledgement, which is rare.

Ways of driving the connections:

- closed loop: every connection keeps up to `inflight` frames in flight (never more than its
  credit) and sends the next ones as they are acknowledged. `inflight=1` is "ack per frame" (the
  worst case in docs/benchmarks.md); `inflight=4` is how a credit-based client streams through
  streamgate's 80 ms window. For the echo servers any text frame acknowledges one frame (and the
  client acts as if it had a 4-frame credit window); for streamgate a `credit` message returns
  bytes.
- real time (open loop): every session sends one 20 ms frame every 20 ms, phases spread over the
  20 ms; it never exceeds the credit it was granted (a frame without credit waits, and its wait
  counts in its latency). Latency is frame-to-credit: from the frame's send (for a frame that
  waited for credit, from its scheduled time) to the credit that returns its bytes (credits
  are matched to frames in order); the pacer's own lateness is reported apart. The pacer takes
  sessions added and removed while it runs (loadtest/capacity.py searches over session counts).
- idle: sessions opened to `ready` that send nothing (memory per idle session).

Standalone use against a running server (the bench drives the same code in-process):

    python -m loadtest.loadgen --ack credit --connections 100 --key KEY \
        --url 'ws://127.0.0.1:8765/v1/asr/stream?model=synthetic&encoding=mulaw&sample_rate=8000'
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import itertools
import json
import math
import os
import socket
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt

from streamgate_protocol.audio import pcm16_to_ulaw

AckMode = Literal["echo", "credit"]

SAMPLE_RATE = 8000
FRAME_MS = 20
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000  # 160 bytes of mu-law per 20 ms
MASK_KEY = b"\x5a\x13\xc7\x2e"  # fixed: servers only unmask, and the frame is precomputed
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CREDIT_PREFIX = b'{"type":"credit","bytes":'
CREDIT_PREFIX_LEN = len(CREDIT_PREFIX)
MAX_SAMPLES = 20  # error/warning payloads and close reasons kept for the report

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_CONNECTING, _OPEN, _CLOSED = 0, 1, 2

perf_counter = time.perf_counter


# --- frames ------------------------------------------------------------------------------------


Signal = Literal["speech", "tone"]
SIGNALS: tuple[Signal, ...] = ("speech", "tone")


def tone_pcm(seed: int = 20) -> npt.NDArray[np.int16]:
    """One 20 ms frame, looped: a 300 Hz tone (exactly 6 periods, so it loops without a click)
    plus white noise at about -16 dBFS. webrtcvad flags its first frames as speech, then adapts
    to the stationary signal and calls the rest noise: the VAD runs, the engine path barely."""
    t = np.arange(FRAME_BYTES) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    x = 5000.0 * np.sin(2 * np.pi * 300.0 * t) + rng.normal(0.0, 500.0, FRAME_BYTES)
    return np.clip(x, -32768, 32767).astype(np.int16)


def speech_pcm(
    speech_s: float = 1.6, pause_s: float = 0.8, level: float = 6000.0, seed: int = 3
) -> npt.NDArray[np.int16]:
    """A 2.4 s loop that webrtcvad keeps calling speech: 1.6 s of voiced "syllables" (a gliding
    120-210 Hz pitch with 17 harmonics shaped by three formants, 4 syllables/s) then 0.8 s of
    low noise, so every loop is one utterance: onset, engine feeds, endpointing, a final."""
    rng = np.random.default_rng(seed)
    n = int(SAMPLE_RATE * speech_s)
    t = np.arange(n) / SAMPLE_RATE
    syllable = (t % 0.25) / 0.25
    envelope = np.sin(np.pi * np.clip(syllable / 0.8, 0.0, 1.0)) ** 0.7
    f0 = 140.0 + 50.0 * np.sin(2 * np.pi * t / 0.9) + 20.0 * np.sin(2 * np.pi * t * 3.1)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = np.zeros(n)
    for k in range(1, 18):
        fk = k * f0
        gain = (np.exp(-(((fk - 700.0) / 350.0) ** 2))
                + 0.6 * np.exp(-(((fk - 1200.0) / 400.0) ** 2))
                + 0.3 * np.exp(-(((fk - 2500.0) / 500.0) ** 2)) + 0.05)
        voiced += gain * np.sin(k * phase) * (fk < 3800.0)
    x = voiced / np.max(np.abs(voiced)) * level * envelope + rng.normal(0.0, 150.0, n)
    pause = rng.normal(0.0, 150.0, int(SAMPLE_RATE * pause_s))
    out: npt.NDArray[np.int16] = np.clip(np.concatenate([x, pause]), -32768, 32767).astype(
        np.int16
    )
    return out


def audio_frames(signal: Signal = "speech") -> list[bytes]:
    """The signal as 20 ms mu-law frames (a whole number of them; the list loops)."""
    pcm = speech_pcm() if signal == "speech" else tone_pcm()
    ulaw = pcm16_to_ulaw(pcm[: len(pcm) - len(pcm) % FRAME_BYTES])
    return [ulaw[i : i + FRAME_BYTES] for i in range(0, len(ulaw), FRAME_BYTES)]


def client_frame(opcode: int, payload: bytes, mask: bytes = MASK_KEY) -> bytes:
    """One final, masked client frame (RFC 6455 5.2)."""
    n = len(payload)
    head = bytearray([0x80 | opcode])
    if n < 126:
        head.append(0x80 | n)
    elif n < 65536:
        head.append(0x80 | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(0x80 | 127)
        head += n.to_bytes(8, "big")
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return bytes(head) + mask + masked


CLOSE_1000 = client_frame(OP_CLOSE, (1000).to_bytes(2, "big"))


def _accept_key(key: bytes) -> str:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()


# --- shared counters ---------------------------------------------------------------------------


class ConnectError(Exception):
    pass


class Stats:
    """Counters shared by every connection of one run (one event loop: no locking)."""

    def __init__(self) -> None:
        self.running = False  # closed loop: send the next frame on ack
        self.recording = False  # inside the measurement window: keep latencies
        self.acked = 0  # frames acknowledged (whole run)
        self.sent = 0  # frames sent (real-time mode)
        self.latencies = array("d")
        self.final_latencies = array("d")  # real time: end of speech -> final transcript
        self.text_types: Counter[str] = Counter()  # non-ack text messages by `type`
        self.samples: list[str] = []  # error/warning payloads, first MAX_SAMPLES
        self.server_closes: Counter[str] = Counter()  # close frames the server initiated
        self.dropped: int = 0  # connections lost without a close handshake we started
        self.pings = 0
        self.binary_frames = 0
        self.deferred = 0  # real time: frames that had to wait for credit
        self.max_backlog = 0

    def sample(self, text: str) -> None:
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(text[:300])


# --- one connection ----------------------------------------------------------------------------


class WsClient(asyncio.Protocol):
    """Handshake, frame parsing and closing; subclasses decide what an ack triggers."""

    def __init__(self, gen: LoadGen) -> None:
        self.stats = gen.stats
        self.credit_mode = gen.target.ack_mode == "credit"
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.state = _CONNECTING
        self.buf = b""
        self.acc = 0  # credit bytes not yet matched to a whole frame
        self.window = 0  # ready.credit_bytes
        self.frames = gen.frames  # masked audio frames, looped; each client starts elsewhere
        self.k = next(gen.starts) % len(self.frames)
        self.closing = False  # a close frame went out (ours or our answer to the server's)
        key = base64.b64encode(os.urandom(16))
        self.expected_accept = _accept_key(key)
        self.request = gen.request_head.replace(b"{KEY}", key)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        sock = t.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self.state == _OPEN
        self.state = _CLOSED
        if not self.opened.done():
            self.opened.set_exception(ConnectError(f"connection lost during handshake: {exc}"))
        elif was_open and not self.closing:
            self.stats.dropped += 1
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.state != _OPEN:
            self._handshake_data(data)
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        n = len(data)
        pos = 0
        acked = 0
        credit_mode = self.credit_mode
        while n - pos >= 2:
            ln = data[pos + 1] & 0x7F  # server frames are never masked
            if ln < 126:
                start = pos + 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + ln
            if end > n:
                break
            op = data[pos] & 0x0F
            if op == OP_TEXT:
                if not credit_mode:
                    acked += FRAME_BYTES
                elif data.startswith(CREDIT_PREFIX, start):
                    acked += int(data[start + CREDIT_PREFIX_LEN : end - 1])
                else:
                    self._text(data[start:end])
            elif op == OP_PING:
                self._ping(data[start:end])
            elif op == OP_CLOSE:
                self._close_frame(data[start:end])
            elif op == OP_BINARY:
                self.on_binary(end - start)
            pos = end
        if pos < n:
            self.buf = data[pos:]
        if acked:
            self.acked(acked)

    def _next_frame(self) -> bytes:
        k = self.k
        self.k = k + 1 if k + 1 < len(self.frames) else 0
        return self.frames[k]

    # what subclasses implement

    def acked(self, nbytes: int) -> None:
        raise NotImplementedError

    def on_ready(self) -> None:
        pass

    def on_message(self, kind: str, msg: dict[str, object]) -> None:
        """A JSON text message other than `credit` (rare: ready, transcripts, usage...)."""

    def on_binary(self, nbytes: int) -> None:
        """A binary frame from the server (TTS audio; ASR sessions get none)."""
        self.stats.binary_frames += 1

    # handshake

    def _handshake_data(self, data: bytes) -> None:
        if self.state == _CLOSED:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 65536:
                self._fail("oversized HTTP response")
            return
        head = self.buf[:end].decode("latin-1")
        rest = self.buf[end + 4 :]
        self.buf = b""
        status_line, *lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != "101":
            body = rest[:200].decode(errors="replace")
            self._fail(f"HTTP {' '.join(parts[1:])} {body}".strip())
            return
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)
        }
        if headers.get("sec-websocket-accept") != self.expected_accept:
            self._fail("bad Sec-WebSocket-Accept")
            return
        self.state = _OPEN
        if not self.credit_mode and not self.opened.done():
            # Echo servers grant no credit: act as if the window were 4 frames (each text
            # frame returns one frame's worth), like streamgate configured by the bench.
            self.window = 4 * FRAME_BYTES
            self.opened.set_result(None)
            self.on_ready()
        if rest:
            self.data_received(rest)

    def _fail(self, reason: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectError(reason))
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()

    # rare frames

    def _text(self, payload: bytes) -> None:
        st = self.stats
        try:
            msg = json.loads(payload)
            kind = str(msg.get("type")) if isinstance(msg, dict) else "?"
        except ValueError:
            msg, kind = None, "?"
        st.text_types[kind] += 1
        if isinstance(msg, dict):
            self.on_message(kind, msg)
        if kind == "ready" and isinstance(msg, dict):
            self.window = int(msg.get("credit_bytes", 0))
            if not self.opened.done():
                self.opened.set_result(None)
                self.on_ready()
        elif kind in ("error", "warning", "?"):
            st.sample(payload.decode(errors="replace"))

    def _ping(self, payload: bytes) -> None:
        self.stats.pings += 1
        if self.transport is not None and not self.closing:
            self.transport.write(client_frame(OP_PONG, payload))

    def _close_frame(self, payload: bytes) -> None:
        if self.closing:
            return  # the answer to our close; the server closes the TCP connection next
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        reason = payload[2:].decode(errors="replace")
        self.stats.server_closes[f"{code} {reason}".strip()] += 1
        self.closing = True
        if self.transport is not None:
            self.transport.write(client_frame(OP_CLOSE, payload[:2]))

    # closing

    def close(self) -> None:
        if self.state == _OPEN and not self.closing and self.transport is not None:
            self.closing = True
            self.transport.write(CLOSE_1000)

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()


class ClosedLoopClient(WsClient):
    """Up to `gen.inflight` frames in flight, within the credit; each ack sends the next ones."""

    def __init__(self, gen: LoadGen) -> None:
        super().__init__(gen)
        self.max_inflight = gen.inflight
        self.credit = 0  # bytes we may still send
        self.sent_at: deque[float] = deque()  # send times of the frames in flight, oldest first

    @property
    def busy(self) -> bool:
        return bool(self.sent_at)

    def on_ready(self) -> None:
        self.credit = self.window

    def send_first(self, now: float) -> None:
        if self.state == _OPEN and self.transport is not None:
            self._fill(now)

    def _fill(self, now: float) -> None:
        n = min(self.credit // FRAME_BYTES, self.max_inflight - len(self.sent_at))
        if n <= 0:
            return
        self.credit -= n * FRAME_BYTES
        self.sent_at.extend(itertools.repeat(now, n))
        # Frames that become sendable together leave in one write (one syscall), as a
        # client streaming from a buffer would send them.
        payload = self._next_frame() if n == 1 else b"".join(
            [self._next_frame() for _ in range(n)])
        self.transport.write(payload)  # type: ignore[union-attr]

    def acked(self, nbytes: int) -> None:
        self.credit += nbytes
        sent_at = self.sent_at
        if not sent_at:
            self.acc = 0  # nothing in flight (the run is over): nothing to match
            return
        acc = self.acc + nbytes
        if acc < FRAME_BYTES:
            self.acc = acc
            return
        now = perf_counter()
        st = self.stats
        recording = st.recording
        while acc >= FRAME_BYTES and sent_at:
            acc -= FRAME_BYTES
            sent = sent_at.popleft()
            st.acked += 1
            if recording:
                st.latencies.append(now - sent)
        self.acc = acc
        if st.running and not self.closing:
            self._fill(now)


class IdleClient(WsClient):
    """A session opened to `ready` that sends nothing."""

    def acked(self, nbytes: int) -> None:
        pass


class RealtimeClient(WsClient):
    """One frame per 20 ms (paced by RealtimePacer), never more in flight than the credit."""

    def __init__(self, gen: LoadGen) -> None:
        super().__init__(gen)
        self.credit = 0  # bytes we may still send
        self.inflight: deque[float] = deque()  # frames sent, not credited: see tick()
        self.backlog: deque[float] = deque()  # scheduled times of frames waiting for credit
        self.t0: float | None = None  # scheduled time of the first frame: audio time 0

    def on_ready(self) -> None:
        self.credit = self.window

    def on_message(self, kind: str, msg: dict[str, object]) -> None:
        # A final's end_ms is audio time; the frame carrying it was scheduled at t0 + end_ms.
        if kind == "transcript" and msg.get("is_final") and self.t0 is not None:
            end_ms = msg.get("end_ms")
            if isinstance(end_ms, int) and self.stats.recording:
                self.stats.final_latencies.append(perf_counter() - self.t0 - end_ms / 1000.0)

    def tick(self, scheduled: float) -> None:
        if self.state != _OPEN or self.closing or self.transport is None:
            return
        if self.t0 is None:
            self.t0 = scheduled
        if self.credit >= FRAME_BYTES and not self.backlog:
            self.credit -= FRAME_BYTES
            # Sent on time but for the pacer's own lateness, which is not the server's doing:
            # latency counts from now. A frame held back for credit counts from its
            # scheduled time (the wait for credit is the server's).
            self.inflight.append(perf_counter())
            self.stats.sent += 1
            self.transport.write(self._next_frame())
        else:
            self.backlog.append(scheduled)
            st = self.stats
            st.deferred += 1
            if len(self.backlog) > st.max_backlog:
                st.max_backlog = len(self.backlog)

    def drop_backlog(self) -> int:
        """Forget the frames still waiting for credit (as a telephony client drops late audio):
        a session count that was too much leaves no backlog to the next, smaller one."""
        dropped = len(self.backlog)
        self.backlog.clear()
        return dropped

    def acked(self, nbytes: int) -> None:
        st = self.stats
        self.credit += nbytes
        acc = self.acc + nbytes
        now = perf_counter()
        inflight = self.inflight
        while acc >= FRAME_BYTES and inflight:
            acc -= FRAME_BYTES
            since = inflight.popleft()
            st.acked += 1
            if st.recording:
                st.latencies.append(now - since)
        self.acc = acc
        backlog = self.backlog
        if backlog and self.transport is not None and not self.closing:
            while backlog and self.credit >= FRAME_BYTES:
                self.credit -= FRAME_BYTES
                inflight.append(backlog.popleft())
                st.sent += 1
                self.transport.write(self._next_frame())


# --- the generator -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str  # path and query string
    ack_mode: AckMode
    api_key: str | None = None  # sent as `Authorization: Bearer`


@dataclass(frozen=True)
class ProbeSample:
    """Cumulative counters of the server process (from /proc in the bench)."""

    user_s: float
    sys_s: float
    reads: int  # read-type syscalls (/proc/<pid>/io syscr)
    writes: int  # write-type syscalls (syscw)
    sleeps: int  # voluntary context switches: the event loop found nothing to do
    # The CPUs as a whole (/proc/stat): to tell how much else ran on them meanwhile.
    server_cpu_busy_s: float = 0.0  # user + nice + system of every task on the server's CPU
    server_cpu_steal_s: float = 0.0  # taken by the hypervisor
    gen_cpu_busy_s: float = 0.0  # same for the generator's CPU
    # user + system of the server's child processes (streamgate: embedded Redis and PostgreSQL,
    # pocketsphinx workers), which run on the server's CPU too.
    helpers_s: float = 0.0

    def __sub__(self, other: ProbeSample) -> ProbeSample:
        return ProbeSample(
            self.user_s - other.user_s, self.sys_s - other.sys_s,
            self.reads - other.reads, self.writes - other.writes, self.sleeps - other.sleeps,
            self.server_cpu_busy_s - other.server_cpu_busy_s,
            self.server_cpu_steal_s - other.server_cpu_steal_s,
            self.gen_cpu_busy_s - other.gen_cpu_busy_s,
            self.helpers_s - other.helpers_s,
        )


class ServerProbe(Protocol):
    """What the bench can tell about the server process (optional)."""

    def sample(self) -> ProbeSample: ...

    def rss_kb(self) -> int: ...


@dataclass
class Percentiles:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    samples: int

    @classmethod
    def of(cls, latencies: array[float]) -> Percentiles:
        if not latencies:
            nan = float("nan")
            return cls(nan, nan, nan, nan, nan, 0)
        a = np.frombuffer(latencies, dtype=np.float64) * 1000.0
        p50, p90, p99, p999 = (float(v) for v in np.percentile(a, [50, 90, 99, 99.9]))
        return cls(p50, p90, p99, p999, float(a.max()), len(a))


@dataclass
class RunResult:
    """One measured run against one server."""

    mode: Literal["closed-loop", "realtime"]
    requested: int
    inflight: int  # closed loop: frames in flight per connection (real time: 0)
    opened: int
    connect_failures: dict[str, int]
    seconds: float  # length of the measurement window
    frames: int  # frames acknowledged inside the window
    fps: float
    latency: Percentiles
    gen_cpu_pct: float
    server_cpu_pct: float | None = None  # user + system, 100% = one core
    server_sys_pct: float | None = None  # the system (kernel) part of it
    server_cpu_s: float | None = None  # user + system seconds in the window
    helpers_cpu_pct: float | None = None  # the server's child processes (Redis, PostgreSQL...)
    server_reads_per_frame: float | None = None
    server_writes_per_frame: float | None = None
    server_sleeps_per_s: float | None = None
    # Other processes on the pinned CPUs during the window (a shared machine is noisy).
    others_on_server_cpu_pct: float | None = None
    others_on_gen_cpu_pct: float | None = None
    steal_pct: float | None = None
    rss_idle_kb: int | None = None  # before any connection
    rss_open_kb: int | None = None  # with every connection open, after the window
    final_latency: Percentiles | None = None  # real time: end of speech -> final (s x 1000)
    target_fps: float | None = None  # real time: sessions x 50
    sent_fps: float | None = None
    deferred: int = 0
    max_backlog: int = 0
    max_sched_lag_ms: float = 0.0
    text_types: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    server_closes: dict[str, int] = field(default_factory=dict)
    dropped: int = 0  # connections lost without a close handshake while the run was on
    aborted_at_close: int = 0  # connections that did not close within the close timeout
    pings: int = 0
    binary_frames: int = 0


class LoadGen:
    def __init__(self, target: Target, signal: Signal = "speech", inflight: int = 1) -> None:
        self.target = target
        self.inflight = inflight  # closed loop: frames each connection keeps in flight
        self.frames = [client_frame(OP_BINARY, f) for f in audio_frames(signal)]
        self.starts = itertools.count(0, 37)  # spread clients over the signal's loop
        self.stats = Stats()
        self.clients: list[WsClient] = []
        self.connect_failures: Counter[str] = Counter()
        self.request_head = (
            f"GET {target.path} HTTP/1.1\r\n"
            f"Host: {target.host}:{target.port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            "Sec-WebSocket-Key: {KEY}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "User-Agent: streamgate-loadgen\r\n"
            + (f"Authorization: Bearer {target.api_key}\r\n" if target.api_key else "")
            + "\r\n"
        ).encode()

    async def connect(
        self,
        n: int,
        factory: Callable[[LoadGen], WsClient],
        *,
        batch: int = 100,
        timeout_s: float = 20.0,
    ) -> None:
        """Open n connections, `batch` handshakes at a time (streamgate: until `ready`)."""
        loop = asyncio.get_running_loop()
        t = self.target

        async def one() -> WsClient:
            _, client = await loop.create_connection(lambda: factory(self), t.host, t.port)
            try:
                await client.opened
            except BaseException:
                client.abort()
                raise
            return client

        for first in range(0, n, batch):
            size = min(batch, n - first)
            tasks = [asyncio.ensure_future(one()) for _ in range(size)]
            done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
                self.connect_failures[f"timeout after {timeout_s:g} s"] += 1
            if pending:
                await asyncio.wait(pending)
            for task in done:
                exc = task.exception()
                if exc is None:
                    self.clients.append(task.result())
                else:
                    self.connect_failures[f"{type(exc).__name__}: {exc}"[:160]] += 1

    async def close(self, timeout_s: float = 5.0) -> int:
        """Close handshake on every connection; abort what is still open after timeout_s."""
        for c in self.clients:
            c.close()
        lost = [c.lost for c in self.clients if not c.lost.done()]
        if lost:
            await asyncio.wait(lost, timeout=timeout_s)
        aborted = 0
        for c in self.clients:
            if not c.lost.done():
                aborted += 1
                c.abort()
        lost = [c.lost for c in self.clients if not c.lost.done()]
        if lost:
            await asyncio.wait(lost, timeout=1.0)
        return aborted

    def abort_all(self) -> None:
        for c in self.clients:
            c.abort()

    def _result(
        self,
        mode: Literal["closed-loop", "realtime"],
        requested: int,
        seconds: float,
        frames: int,
        gen_cpu: float,
        server: ProbeSample | None,
    ) -> RunResult:
        st = self.stats
        result = RunResult(
            mode=mode,
            requested=requested,
            inflight=self.inflight if mode == "closed-loop" else 0,
            opened=len(self.clients),
            connect_failures=dict(self.connect_failures),
            seconds=seconds,
            frames=frames,
            fps=frames / seconds if seconds > 0 else 0.0,
            latency=Percentiles.of(st.latencies),
            gen_cpu_pct=100.0 * gen_cpu / seconds if seconds > 0 else 0.0,
            text_types=dict(st.text_types),
            samples=list(st.samples),
            server_closes=dict(st.server_closes),
            dropped=st.dropped,
            pings=st.pings,
            binary_frames=st.binary_frames,
        )
        if server is not None and seconds > 0:
            result.server_cpu_s = server.user_s + server.sys_s
            result.server_cpu_pct = 100.0 * result.server_cpu_s / seconds
            # A child that exited inside the window takes its CPU time with it: clamp.
            result.helpers_cpu_pct = max(0.0, 100.0 * server.helpers_s / seconds)
            result.server_sys_pct = 100.0 * server.sys_s / seconds
            result.server_sleeps_per_s = server.sleeps / seconds
            if server.server_cpu_busy_s > 0:
                own = server.user_s + server.sys_s
                result.others_on_server_cpu_pct = max(
                    0.0, 100.0 * (server.server_cpu_busy_s - own) / seconds)
                result.others_on_gen_cpu_pct = max(
                    0.0, 100.0 * (server.gen_cpu_busy_s - gen_cpu) / seconds)
                result.steal_pct = 100.0 * server.server_cpu_steal_s / seconds
            if frames:
                result.server_reads_per_frame = server.reads / frames
                result.server_writes_per_frame = server.writes / frames
        return result


def _sample(probe: ServerProbe | None) -> ProbeSample | None:
    return None if probe is None else probe.sample()


def _delta(a: ProbeSample | None, b: ProbeSample | None) -> ProbeSample | None:
    return None if a is None or b is None else b - a


async def run_closed_loop(
    target: Target,
    *,
    connections: int,
    warmup_s: float,
    seconds: float,
    batch: int = 100,
    probe: ServerProbe | None = None,
    signal: Signal = "speech",
    inflight: int = 1,
) -> RunResult:
    """Closed loop: `inflight` frames in flight per connection (1 = ack per frame)."""
    gen = LoadGen(target, signal, inflight)
    rss_idle = None if probe is None else probe.rss_kb()
    try:
        await gen.connect(connections, ClosedLoopClient, batch=batch)
        if not gen.clients:
            raise ConnectError(f"no connection opened: {dict(gen.connect_failures)}")
        window = min(c.window for c in gen.clients)
        if target.ack_mode == "credit" and window // 4 > inflight * FRAME_BYTES:
            # The server returns credit once a quarter window drained: with fewer bytes in
            # flight than that, no credit ever comes back.
            raise ConnectError(
                f"credit window {window} bytes: {inflight} frame(s) in flight never drain a "
                f"quarter of it (asr.session.ingest_queue_ms <= {80 * inflight} for 8 kHz mu-law)")
        st = gen.stats
        clients = cast(list[ClosedLoopClient], gen.clients)
        st.running = True
        now = perf_counter()
        for c in clients:
            c.send_first(now)
        await asyncio.sleep(warmup_s)
        srv0, gen0, acked0 = _sample(probe), time.process_time(), st.acked
        with steady_generator():
            st.recording = True
            t0 = perf_counter()
            await asyncio.sleep(seconds)
            st.recording = False
            elapsed = perf_counter() - t0
        srv1, gen1, acked1 = _sample(probe), time.process_time(), st.acked
        st.running = False
        rss_open = None if probe is None else probe.rss_kb()
        # Let the last frames in flight come back, so closing does not race them.
        for _ in range(100):  # at most 2 s
            if not any(c.busy for c in clients):
                break
            await asyncio.sleep(0.02)
        result = gen._result(
            "closed-loop", connections, elapsed, acked1 - acked0, gen1 - gen0,
            _delta(srv0, srv1),
        )
        result.rss_idle_kb, result.rss_open_kb = rss_idle, rss_open
        result.aborted_at_close = await gen.close()
        result.dropped = st.dropped
        result.server_closes = dict(st.server_closes)
        return result
    finally:
        gen.abort_all()


@dataclass
class IdleResult:
    """Server memory with `opened` sessions open to `ready` and no audio sent."""

    requested: int
    opened: int
    connect_failures: dict[str, int]
    settle_s: float
    rss_before_kb: int  # before the first session
    rss_after_kb: int  # with every session open, after settle_s
    server_closes: dict[str, int] = field(default_factory=dict)
    dropped: int = 0

    @property
    def kib_per_session(self) -> float:
        return (self.rss_after_kb - self.rss_before_kb) / self.opened if self.opened else 0.0


async def run_idle(
    target: Target, *, sessions: int, settle_s: float, probe: ServerProbe, batch: int = 100,
) -> IdleResult:
    """Open `sessions` sessions to `ready`, send nothing, wait settle_s, read the server's RSS."""
    gen = LoadGen(target)
    try:
        rss_before = probe.rss_kb()
        await gen.connect(sessions, IdleClient, batch=batch)
        if not gen.clients:
            raise ConnectError(f"no session opened: {dict(gen.connect_failures)}")
        await asyncio.sleep(settle_s)  # let what a session allocates after `ready` happen
        result = IdleResult(sessions, len(gen.clients), dict(gen.connect_failures), settle_s,
                            rss_before, probe.rss_kb())
        await gen.close()
        result.server_closes = dict(gen.stats.server_closes)
        result.dropped = gen.stats.dropped
        return result
    finally:
        gen.abort_all()


@contextlib.contextmanager
def steady_generator() -> Iterator[None]:
    """No garbage-collector pauses in the generator while it measures.

    A full collection over a generator's thousands of clients stalls its loop for tens of ms,
    and every credit that arrives meanwhile is stamped late: the bench counted that as server
    latency (350 real-time sessions: p99 28.6 ms with the collector on, 2.9 ms with it off,
    same server). What exists now is frozen out of later collections; cycles made inside the
    window wait for its end (a window is seconds to minutes, the garbage is small)."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


class RealtimePacer:
    """Calls tick() on every client once per 20 ms, clients spread over 20 one-ms phases.
    Clients may be added and removed while it runs."""

    PHASES = FRAME_MS

    def __init__(self, clients: list[RealtimeClient]) -> None:
        self.groups: list[list[RealtimeClient]] = [[] for _ in range(self.PHASES)]
        self.add(clients)
        self.max_lag = 0.0
        self.recording = False

    def add(self, clients: list[RealtimeClient]) -> None:
        for c in clients:
            min(self.groups, key=len).append(c)  # the least busy phase

    def remove(self, clients: list[RealtimeClient]) -> None:
        gone = set(clients)
        for group in self.groups:
            group[:] = [c for c in group if c not in gone]  # in place: run() holds the lists

    async def run(self, start: float, stop: float = math.inf) -> None:
        step = FRAME_MS / 1000.0 / self.PHASES
        n = 0  # phase slots done; slot n is due at start + n * step (no drift)
        due = start
        groups = self.groups
        while due < stop:
            now = perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            while due <= now and due < stop:
                if self.recording and now - due > self.max_lag:
                    self.max_lag = now - due
                for c in groups[n % self.PHASES]:
                    c.tick(due)
                n += 1
                due = start + n * step


async def run_realtime(
    target: Target,
    *,
    sessions: int,
    warmup_s: float,
    seconds: float,
    batch: int = 100,
    probe: ServerProbe | None = None,
    signal: Signal = "speech",
) -> RunResult:
    gen = LoadGen(target, signal)
    rss_idle = None if probe is None else probe.rss_kb()
    try:
        await gen.connect(sessions, RealtimeClient, batch=batch)
        if not gen.clients:
            raise ConnectError(f"no session opened: {dict(gen.connect_failures)}")
        st = gen.stats
        clients = cast(list[RealtimeClient], gen.clients)
        pacer = RealtimePacer(clients)
        start = perf_counter() + 0.05
        pacing = asyncio.ensure_future(pacer.run(start, start + warmup_s + seconds))
        try:
            await asyncio.sleep(start - perf_counter() + warmup_s)
            srv0, gen0, acked0, sent0 = _sample(probe), time.process_time(), st.acked, st.sent
            deferred0 = st.deferred
            with steady_generator():
                st.recording = pacer.recording = True
                st.max_backlog = 0
                t0 = perf_counter()
                await pacing
        finally:
            pacing.cancel()
        st.recording = pacer.recording = False
        elapsed = perf_counter() - t0
        srv1, gen1, acked1, sent1 = _sample(probe), time.process_time(), st.acked, st.sent
        rss_open = None if probe is None else probe.rss_kb()
        result = gen._result(
            "realtime", sessions, elapsed, acked1 - acked0, gen1 - gen0,
            _delta(srv0, srv1),
        )
        result.rss_idle_kb, result.rss_open_kb = rss_idle, rss_open
        result.target_fps = len(clients) * 1000.0 / FRAME_MS
        result.sent_fps = (sent1 - sent0) / elapsed
        result.deferred = st.deferred - deferred0
        result.max_backlog = st.max_backlog
        result.max_sched_lag_ms = pacer.max_lag * 1000.0
        result.final_latency = Percentiles.of(st.final_latencies)
        await asyncio.sleep(0.2)  # the last credits
        result.aborted_at_close = await gen.close()
        result.dropped = st.dropped
        result.server_closes = dict(st.server_closes)
        return result
    finally:
        gen.abort_all()


# --- standalone CLI ----------------------------------------------------------------------------


def target_from_url(url: str, ack_mode: AckMode, api_key: str | None = None) -> Target:
    u = urlsplit(url)
    if u.scheme != "ws" or not u.hostname:
        raise ValueError("only ws://host:port/path URLs are supported")
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return Target(u.hostname, u.port or 80, path, ack_mode, api_key)


def format_result(r: RunResult) -> str:
    lat = r.latency
    shape = f"closed loop, {r.inflight} in flight" if r.mode == "closed-loop" else r.mode
    parts = [
        f"{shape}: {r.opened}/{r.requested} connections, {r.fps:,.0f} frames/s acked",
        f"latency p50 {lat.p50_ms:.2f} ms, p99 {lat.p99_ms:.2f} ms, max {lat.max_ms:.1f} ms",
        f"generator CPU {r.gen_cpu_pct:.0f}%",
    ]
    if r.target_fps is not None:
        parts.append(f"target {r.target_fps:,.0f}/s, sent {r.sent_fps or 0:,.0f}/s, "
                     f"deferred {r.deferred}, max backlog {r.max_backlog}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    import uvloop

    parser = argparse.ArgumentParser(prog="python -m loadtest.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--ack", choices=("echo", "credit"), default="credit")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--inflight", type=int, default=1,
                        help="closed loop: frames in flight per connection")
    parser.add_argument("--realtime", action="store_true", help="open loop, 1 frame / 20 ms")
    parser.add_argument("--signal", choices=SIGNALS, default="speech")
    parser.add_argument("--key", default=os.environ.get("STREAMGATE_API_KEY"),
                        help="API key (default: $STREAMGATE_API_KEY)")
    args = parser.parse_args(argv)
    target = target_from_url(args.url, cast(AckMode, args.ack), args.key)

    async def go() -> RunResult:
        if args.realtime:
            return await run_realtime(target, sessions=args.connections, warmup_s=args.warmup,
                                      seconds=args.seconds, signal=args.signal)
        return await run_closed_loop(target, connections=args.connections,
                                     warmup_s=args.warmup, seconds=args.seconds,
                                     signal=args.signal, inflight=args.inflight)

    result = uvloop.run(go())
    print(format_result(result))
    for sample in result.samples:
        print("  server said:", sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
