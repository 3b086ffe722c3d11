"""Swarm: thousands of real-time streamgate sessions from one core, with a report.

    python -m loadtest.swarm --scenario loadtest/scenarios/asr_telephony.toml \
        --url ws://127.0.0.1:8765

Connections are loadgen.py's raw asyncio Protocols (hand-built masked frames, the credit fast
path), on uvloop. One pacer ticks every session once per period (chunk_ms), sessions spread over
1 ms phases so sends do not come in bursts. A scenario (TOML, see loadtest/scenarios/) says what
to run: kind asr|tts, sessions, ramp_per_s, duration_s, encoding, sample_rate, chunk_ms, audio.

Metrics (every latency is wall time on this machine):
- frame_to_credit (ASR): a frame's scheduled send time -> the `credit` that returns its bytes.
  It includes the wait for a quarter of the credit window to drain, so it measures server
  processing only when the window is small (asr.session.ingest_queue_ms = 80 -> per-frame credit).
- credit_lag (ASR): a `credit`'s arrival - the scheduled time of the newest frame it covers: the
  server's processing delay at any window size.
- time_to_first_transcript (ASR): the first frame's scheduled time -> the first `transcript`.
- final_after_end_of_speech (ASR): the send time of the frame carrying audio time `end_ms` ->
  the final `transcript` of that utterance (so it includes `endpointing_ms` of silence; finals
  that `close` flushes are left out).
- tts_time_to_first_audio (TTS): `flush` sent -> the first binary frame after it.
Sessions end with a close handshake: ASR/TTS `close` -> `summary` -> close 1000 is "completed";
anything else is an error, counted by close code (1006: lost without a close frame).

The report (JSON + PNG) goes to loadtest/reports/<timestamp>-<scenario>/. Exit code: 0 when
every session completed without errors, 1 otherwise, 2 for a bad scenario or arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from array import array
from collections import Counter, deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import msgspec
import numpy as np
import soxr

from loadtest.loadgen import (
    _OPEN,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    ConnectError,
    LoadGen,
    Percentiles,
    Stats,
    Target,
    WsClient,
    client_frame,
    speech_pcm,
    tone_pcm,
)
from loadtest.pin import raise_nofile_limit
from streamgate_client.asr_client import API_KEY_ENV, dev_key, load_audio
from streamgate_protocol.audio import pcm16_to_alaw, pcm16_to_ulaw

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "loadtest" / "reports"
METRICS = ("frame_to_credit", "credit_lag", "time_to_first_transcript",
           "final_after_end_of_speech", "tts_time_to_first_audio")
perf_counter = time.perf_counter


class Scenario(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str = "scenario"
    kind: Literal["asr", "tts"] = "asr"
    sessions: int = 100  # concurrent sessions to hold
    ramp_per_s: float = 100.0  # new sessions per second while ramping up
    duration_s: float = 30.0  # from the first connection to the start of closing
    warmup_s: float = 0.0  # latencies before this are left out of the totals (not the timeline)
    session_s: float = 0.0  # > 0: a session closes after this long and a new one replaces it
    model: str = "synthetic"  # "" -> the server's default model
    encoding: Literal["pcm_s16le", "mulaw", "alaw"] = "mulaw"
    sample_rate: int = 8000
    chunk_ms: int = 20  # ASR: audio per binary frame; TTS: playback tick
    audio: str = "speech"  # ASR: speech | tone (loadgen's synthetic 8 kHz loops) | a WAV path
    params: dict[str, str] = {}  # more query parameters: vad, endpointing_ms, voice, ...
    texts: list[str] = msgspec.field(  # TTS: one reply per turn, cycled
        default_factory=lambda: ["Hello, thanks for calling. How can I help you today?"])
    pause_s: float = 1.0  # TTS: silence after a reply has played out, before the next turn
    close_timeout_s: float = 12.0  # close -> summary and close frame, else the session errors

    def check(self) -> None:
        if self.sessions < 1 or self.ramp_per_s <= 0 or self.duration_s <= 0:
            raise ValueError("sessions, ramp_per_s and duration_s must be positive")
        if not 1 <= self.chunk_ms <= 1000 or not 8000 <= self.sample_rate <= 48000:
            raise ValueError("chunk_ms must be 1-1000 and sample_rate 8000-48000")


def load_scenario(path: Path) -> Scenario:
    sc = msgspec.toml.decode(path.read_bytes(), type=Scenario)
    if sc.audio not in ("speech", "tone") and not Path(sc.audio).is_absolute():
        sc.audio = str((path.parent / sc.audio).resolve())  # WAV paths are file-relative
    sc.check()
    return sc


def encode_pcm(pcm: np.ndarray[Any, Any], encoding: str) -> bytes:
    if encoding == "mulaw":
        return pcm16_to_ulaw(pcm)
    if encoding == "alaw":
        return pcm16_to_alaw(pcm)
    return np.asarray(pcm, dtype="<i2").tobytes()


def prepare_audio(audio: str, encoding: str, sample_rate: int) -> bytes:
    """The scenario's audio in the session's encoding and rate (the locustfile uses it too)."""
    if audio not in ("speech", "tone"):
        return load_audio(Path(audio), encoding=encoding, sample_rate=sample_rate).data
    pcm = speech_pcm() if audio == "speech" else np.tile(tone_pcm(), 120)
    if sample_rate != 8000:
        pcm = np.asarray(soxr.resample(pcm, 8000, sample_rate), dtype=np.int16)
    return encode_pcm(pcm, encoding)


def chunks(data: bytes, size: int) -> list[bytes]:
    """Whole chunks only: the list loops, and a short chunk would break the credit matching."""
    return [data[i : i + size] for i in range(0, len(data) - size + 1, size)]


# --- sessions ------------------------------------------------------------------------------------


class SwarmStats(Stats):
    def __init__(self) -> None:
        super().__init__()
        self.lat: dict[str, array[float]] = {m: array("d") for m in METRICS}
        self.outcomes: Counter[str] = Counter()  # "completed", or the error: close code/HTTP
        self.server_errors: Counter[str] = Counter()  # `error` messages by code
        self.audio_bytes_in = 0  # TTS audio received
        self.turns = 0
        self.summary_audio_ms = 0
        self.summary_dropped_ms = 0


class Session(WsClient):
    """What ASR and TTS sessions share: lifetime, the closing handshake, the outcome."""

    def __init__(self, swarm: Swarm) -> None:
        super().__init__(swarm)
        self.swarm, self.sw, self.sc = swarm, swarm.sw, swarm.sc
        self.end_at = math.inf  # when to send `close`
        self.finish_at: float | None = None
        self.close_code: int | None = None
        self.summary = False
        self.slot = -1

    def tick(self, now: float) -> None:
        if self.finish_at is not None:
            if now - self.finish_at > self.sc.close_timeout_s and not self.lost.done():
                self.close_code = self.close_code or -1
                self.abort()
            else:
                self.play(now)  # TTS: audio still plays out while the session closes
        elif now >= self.end_at:
            self.finish(now)
        else:
            self.step(now)

    def step(self, now: float) -> None:
        raise NotImplementedError

    def play(self, now: float) -> None:
        pass

    def finish(self, now: float) -> None:
        self.finish_at = now
        if self.state == _OPEN and not self.closing and self.transport is not None:
            self.transport.write(CLOSE_MSG)

    def on_message(self, kind: str, msg: dict[str, object]) -> None:
        if kind == "summary":
            self.summary = True
            audio_ms, dropped_ms = msg.get("audio_ms"), msg.get("dropped_ms")
            self.sw.summary_audio_ms += audio_ms if isinstance(audio_ms, int) else 0
            self.sw.summary_dropped_ms += dropped_ms if isinstance(dropped_ms, int) else 0
        elif kind == "error":
            self.sw.server_errors[str(msg.get("code"))] += 1

    def _close_frame(self, payload: bytes) -> None:
        if not self.closing and self.close_code is None:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        super()._close_frame(payload)

    def outcome(self) -> str:
        if self.close_code in (-1, -2):
            return "close timeout" if self.close_code == -1 else "credit window < one frame"
        if self.close_code == 1000 and self.summary:
            return "completed"
        if self.close_code == 1000:
            return "1000 without summary"
        return str(self.close_code or 1006)


CLOSE_MSG = client_frame(OP_TEXT, b'{"type":"close"}')
FLUSH_MSG = client_frame(OP_TEXT, b'{"type":"flush"}')


class AsrSession(Session):
    """One frame per chunk_ms at real time, never more bytes in flight than the credit."""

    def __init__(self, swarm: Swarm) -> None:
        super().__init__(swarm)
        self.fb = swarm.frame_bytes
        self.credit = 0
        self.inflight: deque[float] = deque()  # scheduled times of frames sent, not credited
        self.backlog: deque[float] = deque()  # scheduled times of frames waiting for credit
        self.sent = array("d")  # send times of the last frames, for final latencies
        self.base = 0  # frame number of sent[0]
        self.t0: float | None = None  # scheduled time of frame 0: audio time 0
        self.transcripts = 0

    def on_ready(self) -> None:
        self.credit = self.window
        if self.window < self.fb:  # it could never send a frame: say so instead of idling out
            self.sw.sample(f"ready.credit_bytes {self.window} < one {self.sc.chunk_ms} ms frame "
                           f"({self.fb} bytes): lower chunk_ms or raise ingest_queue_ms")
            self.close_code = -2
            self.finish(perf_counter())

    def step(self, now: float) -> None:
        if self.state != _OPEN or self.closing:
            return
        if self.t0 is None:
            self.t0 = now
        if self.credit >= self.fb and not self.backlog:
            self._send(now, now)
        else:
            self.backlog.append(now)
            self.sw.deferred += 1

    def _send(self, scheduled: float, now: float) -> None:
        self.credit -= self.fb
        self.inflight.append(scheduled)
        sent = self.sent
        sent.append(now)
        if len(sent) > self.swarm.keep_frames * 2:  # keep ~35 s: finals come within that
            drop = len(sent) - self.swarm.keep_frames
            del sent[:drop]
            self.base += drop
        self.sw.sent += 1
        self.transport.write(self._next_frame())  # type: ignore[union-attr]

    def acked(self, nbytes: int) -> None:
        now = perf_counter()
        self.credit += nbytes
        acc, fb, lat = self.acc + nbytes, self.fb, self.sw.lat["frame_to_credit"]
        newest = None
        while acc >= fb and self.inflight:
            acc -= fb
            newest = self.inflight.popleft()
            lat.append(now - newest)
            self.sw.acked += 1
        self.acc = acc
        if newest is not None:
            self.sw.lat["credit_lag"].append(now - newest)
        if self.finish_at is None and not self.closing and self.transport is not None:
            while self.backlog and self.credit >= fb:
                self._send(self.backlog.popleft(), now)

    def on_message(self, kind: str, msg: dict[str, object]) -> None:
        if kind == "transcript" and self.t0 is not None:
            now = perf_counter()
            self.transcripts += 1
            if self.transcripts == 1:
                self.sw.lat["time_to_first_transcript"].append(now - self.t0)
            end_ms = msg.get("end_ms")
            # Finals flushed by our `close` skip endpointing: they would blur the metric.
            if msg.get("is_final") and isinstance(end_ms, int) and self.finish_at is None:
                k = max(0, -(-end_ms // self.sc.chunk_ms) - 1) - self.base  # frame with end_ms
                if 0 <= k < len(self.sent):
                    self.sw.lat["final_after_end_of_speech"].append(now - self.sent[k])
        else:
            super().on_message(kind, msg)


class TtsSession(Session):
    """Turns of text + flush; audio "plays" at real time and credit returns what has played."""

    def __init__(self, swarm: Swarm) -> None:
        super().__init__(swarm)
        self.bytes_per_s = 0.0
        self.buffered = 0.0  # received, not yet played
        self.owed = 0.0  # played, not yet returned as credit
        self.last = 0.0
        self.turn = 0
        self.speaking = False  # a turn's text is flushed and its audio not all played
        self.flushed = False
        self.flush_at: float | None = None  # waiting for the first audio of this flush
        self.next_turn_at = 0.0

    def on_message(self, kind: str, msg: dict[str, object]) -> None:
        if kind == "ready" and isinstance(audio := msg.get("audio"), dict):
            width = 2 if audio.get("encoding") == "pcm_s16le" else 1
            self.bytes_per_s = float(audio.get("sample_rate", 8000)) * width
        elif kind == "flushed":
            self.flushed = True
        else:
            super().on_message(kind, msg)

    def data_received(self, data: bytes) -> None:
        # loadgen's parser counts binary frames but drops their sizes, and credit must return
        # exactly the bytes played: so TTS walks the frames itself, reusing the rest of WsClient.
        if self.state != _OPEN:
            super().data_received(data)  # the handshake; it calls back here for what follows
            return
        if self.buf:
            data, self.buf = self.buf + data, b""
        n, pos = len(data), 0
        while n - pos >= 2:
            ln, start = data[pos + 1] & 0x7F, pos + 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln, start = int.from_bytes(data[pos + 2 : pos + 4], "big"), pos + 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln, start = int.from_bytes(data[pos + 2 : pos + 10], "big"), pos + 10
            if start + ln > n:
                break
            op = data[pos] & 0x0F
            if op == OP_BINARY:
                self._audio(ln)
            elif op == OP_TEXT:
                self._text(data[start : start + ln])
            elif op == OP_PING:
                self._ping(data[start : start + ln])
            elif op == OP_CLOSE:
                self._close_frame(data[start : start + ln])
            pos = start + ln
        self.buf = data[pos:]

    def _audio(self, n: int) -> None:
        self.buffered += n
        self.sw.audio_bytes_in += n
        self.sw.binary_frames += 1
        if self.flush_at is not None:
            self.sw.lat["tts_time_to_first_audio"].append(perf_counter() - self.flush_at)
            self.flush_at = None

    def step(self, now: float) -> None:
        self.play(now)
        if self.speaking and self.flushed and self.buffered < 1.0:
            self.speaking = False
            self.sw.turns += 1
            self.next_turn_at = now + self.sc.pause_s
        elif (not self.speaking and now >= self.next_turn_at and self.state == _OPEN
              and not self.closing and self.transport is not None):
            text = self.sc.texts[self.turn % len(self.sc.texts)]
            self.turn += 1
            msg = json.dumps({"type": "text", "text": text}).encode()
            self.transport.write(client_frame(OP_TEXT, msg) + FLUSH_MSG)
            self.speaking, self.flushed, self.flush_at = True, False, now

    def play(self, now: float) -> None:
        dt, self.last = now - self.last if self.last else 0.0, now
        played = min(self.buffered, self.bytes_per_s * dt)
        self.buffered -= played
        self.owed += played
        # Return credit in quarter windows (as the server does), or when playback ran dry.
        owed = int(self.owed)
        if owed and (owed >= self.window // 4 or self.buffered < 1.0) and not self.closing:
            self.owed -= owed
            grant = b'{"type":"credit","bytes":%d}' % owed
            self.transport.write(client_frame(OP_TEXT, grant))  # type: ignore[union-attr]


# --- the swarm -----------------------------------------------------------------------------------


class Swarm(LoadGen):
    def __init__(self, sc: Scenario, url: str, key: str | None) -> None:
        u = urlsplit(url)
        if u.scheme != "ws" or not u.hostname:
            raise ValueError("only ws://host:port URLs are supported")
        path = u.path if u.path not in ("", "/") else f"/v1/{sc.kind}/stream"
        query = dict(parse_qsl(u.query))
        if sc.model:
            query["model"] = sc.model
        query |= {"encoding": sc.encoding, "sample_rate": str(sc.sample_rate), **sc.params}
        super().__init__(Target(u.hostname, u.port or 80, f"{path}?{urlencode(query)}", "credit"))
        self.sc = sc
        self.sw = SwarmStats()
        self.stats = self.sw
        width = 2 if sc.encoding == "pcm_s16le" else 1
        self.frame_bytes = sc.sample_rate * width * sc.chunk_ms // 1000
        self.keep_frames = 35_000 // sc.chunk_ms
        if sc.kind == "asr":
            audio = prepare_audio(sc.audio, sc.encoding, sc.sample_rate)
            self.frames = [client_frame(OP_BINARY, c) for c in chunks(audio, self.frame_bytes)]
            if not self.frames:
                raise ValueError(f"{sc.audio}: shorter than one {sc.chunk_ms} ms frame")
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        self.request_head = self.request_head.replace(
            b"User-Agent: streamgate-loadgen\r\n",
            f"User-Agent: streamgate-swarm\r\n{auth}".encode())
        self.factory = AsrSession if sc.kind == "asr" else TtsSession
        self.slots: list[list[Session]] = [[] for _ in range(sc.chunk_ms)]  # 1 ms phases
        self.next_slot = 0
        self.active: set[Session] = set()
        self.started = 0
        self.stopping = False
        self.max_lag = self.lag = 0.0  # how late the pacer ran: the generator's own health
        self.timeline: list[dict[str, float]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def session(self, loop: asyncio.AbstractEventLoop) -> None:
        """One session from connect to close; then a replacement while the run lasts."""
        try:
            _, c = await loop.create_connection(lambda: self.factory(self), self.target.host,
                                                self.target.port)
        except OSError as exc:
            self.sw.outcomes[f"connect: {exc.strerror or exc}"] += 1
            return
        try:
            await asyncio.wait_for(c.opened, 20.0)
        except (ConnectError, TimeoutError) as exc:
            c.abort()
            why = (str(exc).split(" {")[0][:80] if isinstance(exc, ConnectError)
                   else "no ready within 20 s of the 101" if c.state == _OPEN
                   else "no 101 within 20 s")
            self.sw.outcomes[why] += 1
            return
        now = perf_counter()
        c.end_at = now + self.sc.session_s if self.sc.session_s > 0 else math.inf
        if self.stopping:
            c.finish(now)
        c.slot, self.next_slot = self.next_slot, (self.next_slot + 1) % len(self.slots)
        self.slots[c.slot].append(c)
        self.active.add(c)
        await c.lost
        self.slots[c.slot].remove(c)
        self.active.discard(c)
        outcome = c.outcome()
        self.sw.outcomes[outcome] += 1
        # Churn replaces sessions that completed; a failing server is not hammered by retries.
        if self.sc.session_s > 0 and not self.stopping and outcome == "completed":
            self.spawn(loop)

    def spawn(self, loop: asyncio.AbstractEventLoop) -> None:
        self.started += 1
        task = loop.create_task(self.session(loop))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def pace(self) -> None:
        """Slot n (1 ms) is due at start + n ms: no drift; a late loop catches up in order."""
        step, start, n = 0.001, perf_counter(), 0
        while True:
            due = start + n * step
            now = perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            if now - due > self.lag:
                self.lag = now - due  # this second's worst, for the timeline
            for c in self.slots[n % len(self.slots)]:
                c.tick(now)
            n += 1

    async def sample(self, t_start: float) -> None:
        sw, last = self.sw, {m: 0 for m in METRICS}
        prev = (perf_counter(), time.process_time(), 0, 0, 0)
        while True:
            await asyncio.sleep(1.0)
            now, cpu = perf_counter(), time.process_time()
            dt = now - prev[0]
            row = {"t": round(now - t_start, 2), "active": len(self.active),
                   "frames_sent_per_s": (sw.sent - prev[2]) / dt,
                   "frames_credited_per_s": (sw.acked - prev[3]) / dt,
                   "audio_frames_in_per_s": (sw.binary_frames - prev[4]) / dt,
                   "generator_cpu_pct": 100.0 * (cpu - prev[1]) / dt,
                   "pacer_lag_max_ms": self.lag * 1000.0,
                   "errors": sum(v for k, v in sw.outcomes.items() if k != "completed")}
            for m in METRICS:
                new = sw.lat[m][last[m]:]
                last[m] = len(sw.lat[m])
                if new:
                    p50, p99 = np.percentile(np.frombuffer(new), [50, 99]) * 1000.0
                    row[f"{m}_p50_ms"], row[f"{m}_p99_ms"] = float(p50), float(p99)
            self.timeline.append(row)
            self.max_lag, self.lag = max(self.max_lag, self.lag), 0.0
            prev = (now, cpu, sw.sent, sw.acked, sw.binary_frames)

    async def run(self) -> dict[str, Any]:
        sc, loop = self.sc, asyncio.get_running_loop()
        t_start, cpu0 = perf_counter(), time.process_time()
        helpers = [loop.create_task(self.pace()), loop.create_task(self.sample(t_start))]
        warm_idx, warmed = {m: 0 for m in METRICS}, False
        try:
            end = t_start + sc.duration_s
            while perf_counter() < end:
                due = min(sc.sessions, int((perf_counter() - t_start) * sc.ramp_per_s) + 1)
                while self.started < due:
                    self.spawn(loop)
                if not warmed and perf_counter() - t_start >= sc.warmup_s:
                    warm_idx, warmed = {m: len(self.sw.lat[m]) for m in METRICS}, True
                await asyncio.sleep(min(0.01, max(0.0, end - perf_counter())))
            self.stopping = True
            now = perf_counter()
            for c in list(self.active):
                if c.finish_at is None:
                    c.finish(now)
            if self.tasks:  # every session closes by itself within close_timeout_s (tick)
                await asyncio.wait(set(self.tasks), timeout=sc.close_timeout_s + 20.0)
            elapsed = perf_counter() - t_start
            cpu = time.process_time() - cpu0
        finally:
            for t in [*helpers, *self.tasks]:
                t.cancel()
            self.abort_all()
            for c in list(self.active):
                c.abort()
        return self.report(elapsed, cpu, warm_idx)

    def report(self, elapsed: float, cpu: float, warm_idx: dict[str, int]) -> dict[str, Any]:
        sw, sc = self.sw, self.sc
        errors = {k: v for k, v in sw.outcomes.items() if k != "completed"}
        latency: dict[str, Any] = {}
        for m in METRICS:
            data = sw.lat[m][warm_idx[m]:]
            if not data:
                continue
            p = Percentiles.of(data)
            ms = np.frombuffer(data) * 1000.0
            counts, edges = np.histogram(ms, bins=np.geomspace(0.1, 100_000.0, 31))
            latency[m] = {"p50": p.p50_ms, "p90": p.p90_ms, "p99": p.p99_ms, "max": p.max_ms,
                          "count": p.samples, "histogram": {
                              "edges_ms": [round(float(e), 3) for e in edges],
                              "counts": [int(c) for c in counts]}}
        return {
            "scenario": msgspec.to_builtins(sc), "target": self.target.path,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": elapsed,
            "sessions": {"target": sc.sessions, "started": self.started,
                         "completed": sw.outcomes.get("completed", 0),
                         "errors": sum(errors.values()), "errors_by_close_code": errors},
            "frames": {"sent": sw.sent, "credited": sw.acked, "deferred": sw.deferred,
                       "audio_frames_in": sw.binary_frames, "audio_bytes_in": sw.audio_bytes_in},
            "tts_turns": sw.turns,
            "summary_audio_ms": sw.summary_audio_ms, "summary_dropped_ms": sw.summary_dropped_ms,
            "latency_ms": latency,
            "server_messages": dict(sw.text_types), "server_errors": dict(sw.server_errors),
            "server_samples": sw.samples,
            "generator": {"cpu_pct": 100.0 * cpu / elapsed, "max_pacer_lag_ms":
                          self.max_lag * 1000.0, "pid": os.getpid()},
            "timeline": self.timeline,
        }


# --- report --------------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    rows = report["timeline"]
    t = [r["t"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    for m in METRICS:
        for q, style in (("p50", "-"), ("p99", "--")):
            key = f"{m}_{q}_ms"
            pts = [(r["t"], r[key]) for r in rows if key in r]
            if pts:
                ax1.plot(*zip(*pts, strict=True), style, label=f"{m.replace('_', ' ')} {q}")
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms, per 1 s window)")
    ax1.grid(True, which="both", alpha=0.3)
    if ax1.lines:
        ax1.legend(fontsize=7, ncol=2)
    sc = report["scenario"]
    ax1.set_title(f"swarm {sc['name']}: {sc['kind']}, {sc['sessions']} sessions, "
                  f"{sc['encoding']} {sc['sample_rate']} Hz, {sc['chunk_ms']} ms")
    key = "frames_sent_per_s" if sc["kind"] == "asr" else "audio_frames_in_per_s"
    ax2.plot(t, [r[key] for r in rows], color="tab:blue", label=key.replace("_", " "))
    if sc["kind"] == "asr":
        ax2.plot(t, [r["frames_credited_per_s"] for r in rows], color="tab:cyan",
                 label="frames credited per s")
    ax2.set_ylabel("frames/s")
    ax2.set_xlabel("seconds since start")
    ax2.grid(True, alpha=0.3)
    ax3 = ax2.twinx()
    ax3.plot(t, [r["active"] for r in rows], color="tab:orange", label="active sessions")
    ax3.set_ylabel("active sessions")
    lines = ax2.get_legend_handles_labels()
    more = ax3.get_legend_handles_labels()
    ax2.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_text(r: dict[str, Any]) -> str:
    s = r["sessions"]
    out = [f"swarm {r['scenario']['name']}: {s['started']} sessions started, {s['completed']} "
           f"completed, {s['errors']} errors {s['errors_by_close_code'] or ''}".rstrip()]
    for m, p in r["latency_ms"].items():
        out.append(f"  {m:<26} p50 {p['p50']:8.2f}  p90 {p['p90']:8.2f}  p99 {p['p99']:8.2f}  "
                   f"max {p['max']:8.1f} ms  (n={p['count']})")
    f, g = r["frames"], r["generator"]
    out.append(f"  frames sent {f['sent']:,}, credited {f['credited']:,}, waited for credit "
               f"{f['deferred']:,}; audio frames in {f['audio_frames_in']:,}; server errors "
               f"{r['server_errors'] or 'none'}")
    out += [f"  server said: {sample}" for sample in list(dict.fromkeys(r["server_samples"]))[:3]]
    out.append(f"  generator CPU {g['cpu_pct']:.0f}%, max pacer lag {g['max_pacer_lag_ms']:.1f} ms")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m loadtest.swarm`."""
    parser.add_argument("--scenario", type=Path, required=True, help="scenario TOML file")
    parser.add_argument("--url", default="ws://127.0.0.1:8765",
                        help="server (ws://host:port; a path overrides the scenario kind's)")
    parser.add_argument("--key", default=None, help=f"API key (default ${API_KEY_ENV}, or the "
                        "dev key for a local server; --key '' sends none)")
    parser.add_argument("--sessions", type=int, help="override the scenario's sessions")
    parser.add_argument("--duration", type=float, help="override duration_s")
    parser.add_argument("--ramp", type=float, help="override ramp_per_s")
    parser.add_argument("--out", type=Path, help="report directory (default "
                        "loadtest/reports/<timestamp>-<scenario>)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart (JSON only)")


def run_cli(args: argparse.Namespace) -> int:
    """Run with parsed arguments; returns the exit code (see the module docstring)."""
    try:
        sc = load_scenario(args.scenario)
        for attr, value in (("sessions", args.sessions), ("duration_s", args.duration),
                            ("ramp_per_s", args.ramp)):
            if value is not None:
                setattr(sc, attr, value)
        sc.check()
        key = args.key if args.key is not None else (
            os.environ.get(API_KEY_ENV) or dev_key(args.url))
        swarm = Swarm(sc, args.url, key)
    except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        print(f"swarm: {exc}", file=sys.stderr)
        return 2
    raise_nofile_limit()  # a thousand sessions need more than the usual 1024 descriptors
    import uvloop

    report = uvloop.run(swarm.run())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or REPORTS / f"{stamp}-{sc.name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(summary_text(report))
    if not args.no_plot:
        try:
            plot(report, out / "report.png")
        except ImportError:
            print("  no plot: matplotlib is not installed (pip install -e '.[load]')")
    print(f"  report: {out}")
    return 0 if report["sessions"]["errors"] == 0 and report["sessions"]["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.swarm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
