"""Twilio Media Streams calls, as a provider places them, and the most calls one core keeps up with.

A call (`TwilioCall`) is what Twilio's media streams put on a server: a WebSocket upgrade with
no key, `connected`, `start` (the API key in `customParameters.api_key`, as docs/protocol.md
says), then one `media` JSON text frame with 20 ms of base64 G.711 mu-law every 20 ms for as long
as the call lasts (calls spread over the 20 ms, paced by loadgen.RealtimePacer), the speech-like
loop of loadgen.audio_frames so that VAD, utterances, the agent and its spoken replies all run.
It reads what the server sends back: `media` (agent audio, "played" in real time), `mark`
(answered once the audio before it has played, as Twilio does, with the next media frame; a
`clear` plays nothing more and answers the marks held with the next frame) and `clear`.
Frames are masked and built by hand; every call also sends a WebSocket ping every
`PING_EVERY_S` and times its pong (ping RTT: how late the server's event loop answers).

`CallSearch` tries counts as capacity.CapacitySearch does (steps, then bisection), each with
fresh calls (connected over a ramp, a warm-up, a measured window, then all hang up), and
judges each count by issue 15's keep-up rules: every call connected and none lost; over the
calls' lives no audio dropped and >= 99.9 % of the audio sent accepted; inside the window
server CPU <= 90 %, p99 ingest lag under the server's limit, ping RTT p99 < 50 ms.
What the server says (audio accepted and dropped, ingest lag) comes from a `ServerView`: for
streamgate its /metrics counters and histogram, for the Pipecat peer its /stats endpoint
(loadtest/pipecat_peer/server.py). A rule the server cannot report is "not measured", never
guessed.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import time
from array import array
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from loadtest.capacity import next_count
from loadtest.loadgen import (
    _OPEN,
    FRAME_MS,
    MASK_KEY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    LoadGen,
    Percentiles,
    ProbeSample,
    RealtimeClient,
    RealtimePacer,
    ServerProbe,
    Target,
    audio_frames,
    client_frame,
    steady_generator,
)

perf_counter = time.perf_counter
TWILIO_PATH = "/v1/telephony/twilio"
PING_EVERY_S = 1.0
RAMP_TICK_S = 0.1
CLOSE_WAIT_S = 5.0
SETTLE_MAX_S = 20.0  # after the last call hung up: its session ends and publishes its counters
SETTLE_POLL_S = 0.5
GENERATOR_BUSY_PCT = 90.0
# Issue 15's keep-up rules.
MIN_ACCEPTED = 0.999
MAX_SERVER_CPU_PCT = 90.0
MAX_PING_RTT_P99_MS = 50.0
MAX_LAG_P99_MS = 20.0  # streamgate: frame read -> through VAD, measured in the server
PEER_MAX_LAG_P99_MS = 200.0  # Pipecat: frame read -> its STT stage (unbounded queues)


# --- frames --------------------------------------------------------------------------------------


_mask_ints: dict[int, int] = {}


def masked_text(payload: bytes) -> bytes:
    """A final masked text frame; the XOR runs as one big-int operation (a few hundred bytes a
    frame, tens of thousands of frames a second: per-byte Python would bound the generator)."""
    n = len(payload)
    mask = _mask_ints.get(n)
    if mask is None:
        mask = _mask_ints[n] = int.from_bytes((MASK_KEY * (n // 4 + 1))[:n], "little")
    body = (int.from_bytes(payload, "little") ^ mask).to_bytes(n, "little")
    if n < 126:
        return bytes((0x81, 0x80 | n)) + MASK_KEY + body
    return bytes((0x81, 0xFE)) + n.to_bytes(2, "big") + MASK_KEY + body


def start_message(stream_sid: str, call_sid: str, api_key: str | None) -> bytes:
    params = f'{{"api_key":"{api_key}"}}' if api_key else "{}"
    return (
        f'{{"event":"start","sequenceNumber":"1","streamSid":"{stream_sid}","start":{{'
        f'"streamSid":"{stream_sid}","accountSid":"ACbench","callSid":"{call_sid}",'
        f'"tracks":["inbound"],"customParameters":{params},"mediaFormat":{{'
        f'"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}}}}'
    ).encode()


CONNECTED = b'{"event":"connected","protocol":"Call","version":"1.0.0"}'
MEDIA = (b'{"event":"media","sequenceNumber":"%d","streamSid":"%s","media":{"track":"inbound",'
         b'"chunk":"%d","timestamp":"%d","payload":"%s"}}')
MARK = b'{"event":"mark","sequenceNumber":"%d","streamSid":"%s","mark":{"name":"%s"}}'
STOP = b'{"event":"stop","sequenceNumber":"%d","streamSid":"%s","stop":{"callSid":"%s"}}'


def json_string(msg: bytes, key: bytes) -> bytes:
    """The string value of the first `key` in a JSON text, found without decoding the whole
    message (servers differ in spacing: `"event":"media"`, `"event": "media"`)."""
    i = msg.find(key)
    if i < 0:
        return b""
    i = msg.find(b'"', i + len(key))
    if i < 0:
        return b""
    j = msg.find(b'"', i + 1)
    return msg[i + 1 : j] if j > i else b""


# --- one call ------------------------------------------------------------------------------------


class CallStats:
    """Counters of every call of one run (one event loop: no locking)."""

    def __init__(self) -> None:
        self.recording = False
        self.sent = 0  # media frames sent (20 ms each)
        self.media_in = 0  # agent audio frames received
        self.agent_ms = 0.0  # agent audio received, ms
        self.marks_in = 0
        self.marks_answered = 0
        self.clears = 0
        self.rtts = array("d")  # ping RTTs inside the window (s)
        self.pings_unanswered = 0
        self.server_closes: Counter[str] = Counter()
        self.dropped = 0  # lost without a close handshake we started
        self.other: Counter[str] = Counter()  # other server events


class TwilioCall(RealtimeClient):
    """One call: a RealtimeClient (so RealtimePacer paces it) that speaks Twilio, not credit."""

    def __init__(self, gen: LoadGen) -> None:
        super().__init__(gen)
        load = cast(TwilioLoad, gen)
        self.calls = load.calls
        self.n = load.next_call()
        self.sid = b"MZbench%07d" % self.n
        self.call_sid = f"CAbench{self.n:07d}"
        self.api_key = load.api_key
        self.payloads = load.payloads
        self.k = (37 * self.n) % len(self.payloads)
        self.seq = 2
        self.chunk = 0
        self.ping_at = 0.0  # next ping due (perf_counter)
        self.pings: dict[bytes, float] = {}
        self.play_until = 0.0  # when the agent audio received so far ends, played in real time
        # Marks not yet "played", in order: (when the audio before it has played, its name).
        # They are answered with the first media frame sent after that (in the same write:
        # a syscall per mark would cost the generator as much as the media frames do).
        self.marks: deque[tuple[float, bytes]] = deque()

    # handshake: a provider sends no Authorization header and waits for no `ready`

    def _handshake_data(self, data: bytes) -> None:
        super()._handshake_data(data)
        if self.state == _OPEN and not self.opened.done() and self.transport is not None:
            self.transport.write(masked_text(CONNECTED) + masked_text(
                start_message(self.sid.decode(), self.call_sid, self.api_key)))
            self.opened.set_result(None)
            self.ping_at = perf_counter() + PING_EVERY_S * ((self.n * 0.618) % 1.0)

    def tick(self, scheduled: float) -> None:
        t = self.transport
        if self.state != _OPEN or self.closing or t is None:
            return
        k = self.k
        self.k = k + 1 if k + 1 < len(self.payloads) else 0
        chunk = self.chunk = self.chunk + 1
        seq = self.seq = self.seq + 1
        frame = masked_text(MEDIA % (seq, self.sid, chunk, chunk * FRAME_MS, self.payloads[k]))
        marks = self.marks
        while marks and marks[0][0] <= scheduled:
            self.seq += 1
            frame += masked_text(MARK % (self.seq, self.sid, marks.popleft()[1]))
            self.calls.marks_answered += 1
        if scheduled >= self.ping_at:
            self.ping_at = scheduled + PING_EVERY_S
            token = b"%08d" % seq
            self.pings[token] = perf_counter()
            frame += client_frame(OP_PING, token)
        t.write(frame)
        self.calls.sent += 1

    def data_received(self, data: bytes) -> None:
        if self.state != _OPEN:
            self._handshake_data(data)
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        n = len(data)
        pos = 0
        while n - pos >= 2:
            ln = data[pos + 1] & 0x7F
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
                self._event(data[start:end])
            elif op == OP_PONG:
                sent = self.pings.pop(data[start:end], None)
                if sent is not None and self.calls.recording:
                    self.calls.rtts.append(perf_counter() - sent)
            elif op == OP_PING:
                self._ping(data[start:end])
            elif op == OP_CLOSE:
                self._close_frame(data[start:end])
            pos = end
        if pos < n:
            self.buf = data[pos:]

    def _event(self, msg: bytes) -> None:
        calls = self.calls
        event = json_string(msg, b'"event"')
        if event == b"media":
            # The payload's length is all a player needs: base64 of 8 kHz mu-law, 8 bytes a ms.
            ms = len(json_string(msg, b'"payload"')) * 3 / 4 / 8.0
            now = perf_counter()
            self.play_until = max(self.play_until, now) + ms / 1000.0
            calls.media_in += 1
            calls.agent_ms += ms
        elif event == b"mark":
            name = json_string(msg, b'"name"')
            calls.marks_in += 1
            self.marks.append((self.play_until, name))
        elif event == b"clear":
            calls.clears += 1
            # Nothing more plays; Twilio answers the marks of the audio it threw away at once.
            self.play_until = now = perf_counter()
            self.marks = deque((now, name) for _, name in self.marks)
        else:
            calls.other[event.decode(errors="replace") or "?"] += 1

    def hang_up(self) -> None:
        """`stop`, then the close handshake: how a provider ends a call."""
        self.marks.clear()
        if self.state == _OPEN and not self.closing and self.transport is not None:
            self.seq += 1
            self.transport.write(masked_text(STOP % (self.seq, self.sid,
                                                     self.call_sid.encode())))
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self.state == _OPEN and not self.closing
        super().connection_lost(exc)
        if was_open and self.opened.done():
            self.calls.dropped += 1
        self.marks.clear()

    def _close_frame(self, payload: bytes) -> None:
        if not self.closing:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.calls.server_closes[f"{code} {payload[2:].decode(errors='replace')}"
                                     .strip()] += 1
        super()._close_frame(payload)

    def unanswered_pings(self) -> int:
        return len(self.pings)


class TwilioLoad(LoadGen):
    """The calls of one run; `api_key` goes into every `start` event."""

    def __init__(self, target: Target, api_key: str | None) -> None:
        super().__init__(target, "speech")
        self.api_key = api_key
        self.calls = CallStats()
        self.payloads = [base64.b64encode(f) for f in audio_frames("speech")]
        self._next = 0

    def next_call(self) -> int:
        self._next += 1
        return self._next


# --- what the server says ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerCounters:
    """Cumulative counters read from the server; None where it does not report the number."""

    accepted_ms: float | None
    dropped_ms: float | None
    lag_buckets: dict[float, float] | None  # cumulative histogram: upper bound (s) -> count
    calls_open: float | None = None  # calls the server still holds (None: not reported)


ServerView = Callable[[], Awaitable[ServerCounters]]
LAG_METRIC = "streamgate_ingest_lag_seconds"
LAG_KIND = "telephony"
_SAMPLE_RE = re.compile(r'^([a-z_]+)(?:\{([^}]*)\})?\s+(\S+)$')
_LABEL_RE = re.compile(r'(\w+)="([^"]*)"')


def streamgate_counters(text: str) -> ServerCounters:
    """From streamgate's /metrics: audio accepted and dropped at ingest (every kind summed: the
    telephony bench's server carries calls only; a call's audio goes through the ASR runner) and
    the ingest-lag histogram of telephony frames, when the server has it."""
    accepted = dropped = 0.0
    seen_accepted = seen_dropped = False
    active: float | None = None
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        match = _SAMPLE_RE.match(line.strip())
        if match is None:
            continue
        name, labels, value = match.groups()
        if name == "streamgate_audio_accepted_ms_total":
            accepted += float(value)
            seen_accepted = True
        elif name == "streamgate_audio_dropped_ms_total":
            dropped += float(value)
            seen_dropped = True
        elif name == "streamgate_sessions_active":
            if dict(_LABEL_RE.findall(labels or "")).get("kind") == LAG_KIND:
                active = (active or 0.0) + float(value)
        elif name == LAG_METRIC + "_bucket":
            found = dict(_LABEL_RE.findall(labels or ""))
            if found.get("kind") == LAG_KIND and "le" in found:
                bound = float(found["le"])  # "+Inf" parses
                buckets[bound] = buckets.get(bound, 0.0) + float(value)
    return ServerCounters(accepted if seen_accepted else None,
                          dropped if seen_dropped else None, buckets or None,
                          0.0 if active is None and seen_accepted else active)


def lag_p99_ms(before: dict[float, float], after: dict[float, float]) -> tuple[float, int]:
    """The p99 of a cumulative histogram's increase between two reads (Prometheus-style linear
    interpolation inside the bucket), and how many observations fell in between."""
    bounds = sorted(after)
    diff = [(b, after[b] - before.get(b, 0.0)) for b in bounds]
    total = diff[-1][1] if diff else 0.0
    if total <= 0:
        return math.nan, 0
    want = 0.99 * total
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in diff:
        if count >= want:
            if math.isinf(bound):
                return lo_bound * 1000.0, int(total)  # past the last finite bucket
            span = count - lo_count
            frac = (want - lo_count) / span if span > 0 else 1.0
            return 1000.0 * (lo_bound + (bound - lo_bound) * frac), int(total)
        lo_bound, lo_count = bound, count
    return math.nan, int(total)


# --- the search ----------------------------------------------------------------------------------


@dataclass
class CallStep:
    """One call count, measured over one window."""

    calls: int
    opened: int
    seconds: float
    sent_ms: float
    accepted_ms: float | None
    dropped_ms: float | None
    lag_p99_ms: float | None  # None: the server does not report it
    lag_samples: int
    rtt: Percentiles
    server_cpu_pct: float
    server_sys_pct: float
    helpers_cpu_pct: float
    gen_cpu_pct: float
    pacer_lag_ms: float
    others_on_server_cpu_pct: float
    others_on_gen_cpu_pct: float
    rss_kb: int
    lost: int  # calls closed by the server or dropped inside the step
    connect_failures: dict[str, int]
    media_in: int
    marks_in: int
    marks_answered: int
    clears: int
    why_not: str = ""

    @property
    def passed(self) -> bool:
        return not self.why_not

    @property
    def accepted_fraction(self) -> float | None:
        if self.accepted_ms is None or self.sent_ms <= 0:
            return None
        return self.accepted_ms / self.sent_ms

    @property
    def cpu_pct_per_call(self) -> float | None:
        return self.server_cpu_pct / self.opened if self.opened else None


@dataclass
class CallCapacity:
    name: str  # streamgate / pipecat
    lag_limit_ms: float
    lag_what: str  # what the server's lag measures
    rss_base_kb: int
    steps: list[CallStep] = field(default_factory=list)
    stopped: str = ""
    elapsed_s: float = 0.0
    refused: bool = False
    # The whole search, once every call has hung up: audio sent, and what the server accepted
    # and dropped (its counters from before the first call to after the last).
    total_sent_ms: float = 0.0
    total_accepted_ms: float | None = None
    total_dropped_ms: float | None = None

    @property
    def best(self) -> CallStep | None:
        return max((s for s in self.steps if s.passed), key=lambda s: s.calls, default=None)

    @property
    def largest(self) -> CallStep | None:
        return max(self.steps, key=lambda s: s.calls, default=None)

    @property
    def calls(self) -> int:
        best = self.best
        return 0 if best is None else best.calls

    @property
    def open_ended(self) -> bool:
        """No count failed: the answer is a lower bound."""
        return self.best is not None and all(s.passed for s in self.steps)

    @property
    def lag_measured(self) -> bool:
        return any(s.lag_p99_ms is not None for s in self.steps)

    @property
    def rss_step(self) -> CallStep | None:
        """The step RSS per call is read at: the largest count kept up with among those run
        while the counts only grew (so no larger count's buffers sit in the allocator's
        high-water mark, and no overload's backlog in the sockets); else the largest count."""
        growing: list[CallStep] = []
        for step in self.steps:
            if growing and step.calls <= growing[-1].calls:
                break
            growing.append(step)
        passed = [s for s in growing if s.passed]
        return passed[-1] if passed else self.largest

    def kib_per_call(self) -> float | None:
        step = self.rss_step
        if step is None or not step.opened:
            return None
        return (step.rss_kb - self.rss_base_kb) / step.opened


class CallSearch:
    def __init__(
        self, name: str, target: Target, api_key: str | None, probe: ServerProbe,
        view: ServerView, *, lag_limit_ms: float, lag_what: str, warmup_s: float = 3.0,
        seconds: float = 10.0, ramp_s: float = 5.0, batch: int = 100,
    ) -> None:
        self.name = name
        self.gen = TwilioLoad(target, api_key)
        self.probe = probe
        self.view = view
        self.lag_limit_ms = lag_limit_ms
        self.lag_what = lag_what
        self.warmup_s = warmup_s
        self.seconds = seconds
        self.ramp_s = ramp_s
        self.batch = batch
        self.pacer = RealtimePacer([])

    @property
    def clients(self) -> list[TwilioCall]:
        return cast(list[TwilioCall], self.gen.clients)

    async def run(self, *, step: int, resolution: int, max_calls: int, budget_s: float,
                  first: int | None = None) -> CallCapacity:
        cap = CallCapacity(self.name, self.lag_limit_ms, self.lag_what, self.probe.rss_kb())
        view0 = await self.view()
        started = perf_counter()
        pacing = asyncio.ensure_future(self.pacer.run(perf_counter() + 0.05))
        try:
            lo, hi = 0, None
            n: int | None = first or step
            while n is not None:
                if (perf_counter() - started + self.ramp_s + self.warmup_s + self.seconds
                        + 3.0 > budget_s):
                    cap.stopped = f"time budget ({budget_s:g} s) reached"
                    break
                s = await self.measure(n)
                cap.steps.append(s)
                print(f"bench: {self.name} calls: {format_call_step(s)}", flush=True)
                if s.connect_failures and any(k.startswith("HTTP") for k in s.connect_failures):
                    cap.refused = True
                    cap.stopped = "the server refused calls"
                    break
                if s.passed:
                    lo = max(lo, n)
                else:
                    hi = n if hi is None else min(hi, n)
                n = next_count(lo, hi, step, resolution, max_calls)
                if first and n is not None and hi is None and lo == first:
                    n = None  # a fixed count: one step
            else:
                cap.stopped = (f"reached the most calls tried ({max_calls})" if hi is None
                               else f"resolved to {resolution} calls")
            if not cap.stopped:
                cap.stopped = "one count measured"
        finally:
            pacing.cancel()
            cap.elapsed_s = perf_counter() - started
            await self.hang_up_all()
        view1 = await self.settled()
        cap.total_sent_ms = float(self.gen.calls.sent * FRAME_MS)
        if view0.accepted_ms is not None and view1.accepted_ms is not None:
            cap.total_accepted_ms = view1.accepted_ms - view0.accepted_ms
        if view0.dropped_ms is not None and view1.dropped_ms is not None:
            cap.total_dropped_ms = view1.dropped_ms - view0.dropped_ms
        return cap

    async def hang_up_all(self) -> None:
        clients = self.clients
        self.pacer.remove(cast(list[RealtimeClient], clients))
        for c in clients:
            c.hang_up()
        lost = [c.lost for c in clients if not c.lost.done()]
        if lost:
            await asyncio.wait(lost, timeout=CLOSE_WAIT_S)
        self.gen.abort_all()
        self.gen.clients.clear()

    async def measure(self, n: int) -> CallStep:
        """n fresh calls: ramp, warm-up, the measured window, then every call hangs up. The
        audio rules are judged over the calls' whole lives, from the server's counters before
        the first call and after the last one ended (a call publishes them with each usage
        report and at its end, so only then are they exact); CPU, lag and RTT in the window."""
        calls = self.gen.calls
        failures0 = Counter(self.gen.connect_failures)
        closes0, dropped0 = sum(calls.server_closes.values()), calls.dropped
        life0, life_sent0 = await self.view(), calls.sent
        await self.grow(n)
        await asyncio.sleep(self.warmup_s)
        calls.rtts = array("d")
        for c in self.clients:
            c.pings.clear()  # pongs of pings sent before the window are not timed
        view0 = await self.view()
        srv0, gen0 = self.probe.sample(), time.process_time()
        media0, marks0, answered0, clears0 = (calls.media_in, calls.marks_in,
                                              calls.marks_answered, calls.clears)
        with steady_generator():
            calls.recording = self.pacer.recording = True
            self.pacer.max_lag = 0.0
            t0 = perf_counter()
            await asyncio.sleep(self.seconds)
            srv1, gen1 = self.probe.sample(), time.process_time()
            view1 = await self.view()
            elapsed = perf_counter() - t0
            calls.recording = self.pacer.recording = False
        await asyncio.sleep(0.2)  # the last pongs
        unanswered = sum(c.unanswered_pings() for c in self.clients)
        step = self._step(n, elapsed, srv1 - srv0, gen1 - gen0, view0, view1)
        step.connect_failures = dict(Counter(self.gen.connect_failures) - failures0)
        step.lost = sum(calls.server_closes.values()) - closes0 + calls.dropped - dropped0
        step.media_in, step.marks_in = calls.media_in - media0, calls.marks_in - marks0
        step.marks_answered, step.clears = calls.marks_answered - answered0, calls.clears - clears0
        await self.hang_up_all()
        life1 = await self.settled()
        step.sent_ms = float((calls.sent - life_sent0) * FRAME_MS)
        if life0.accepted_ms is not None and life1.accepted_ms is not None:
            step.accepted_ms = life1.accepted_ms - life0.accepted_ms
        if life0.dropped_ms is not None and life1.dropped_ms is not None:
            step.dropped_ms = life1.dropped_ms - life0.dropped_ms
        step.why_not = self.verdict(step, unanswered)
        return step

    async def settled(self) -> ServerCounters:
        """The server's counters once it holds no call and they stopped moving (at most
        SETTLE_MAX_S): every call ended has published what it accepted."""
        deadline = perf_counter() + SETTLE_MAX_S
        last = await self.view()
        while perf_counter() < deadline:
            await asyncio.sleep(SETTLE_POLL_S)
            now = await self.view()
            if not now.calls_open and now.accepted_ms == last.accepted_ms:
                return now
            last = now
        return last

    def _step(self, n: int, elapsed: float, srv: ProbeSample, gen_cpu: float,
              view0: ServerCounters, view1: ServerCounters) -> CallStep:
        lag: float | None = None
        lag_samples = 0
        if view0.lag_buckets is not None and view1.lag_buckets is not None:
            lag, lag_samples = lag_p99_ms(view0.lag_buckets, view1.lag_buckets)
        own = srv.user_s + srv.sys_s
        return CallStep(
            calls=n, opened=sum(1 for c in self.clients if c.state == _OPEN and not c.closing),
            seconds=elapsed, sent_ms=0.0, accepted_ms=None, dropped_ms=None,
            lag_p99_ms=lag, lag_samples=lag_samples, rtt=Percentiles.of(self.gen.calls.rtts),
            server_cpu_pct=100.0 * own / elapsed, server_sys_pct=100.0 * srv.sys_s / elapsed,
            helpers_cpu_pct=max(0.0, 100.0 * srv.helpers_s / elapsed),
            gen_cpu_pct=100.0 * gen_cpu / elapsed, pacer_lag_ms=1000.0 * self.pacer.max_lag,
            others_on_server_cpu_pct=max(0.0, 100.0 * (srv.server_cpu_busy_s - own
                                                       - srv.helpers_s) / elapsed),
            others_on_gen_cpu_pct=max(0.0, 100.0 * (srv.gen_cpu_busy_s - gen_cpu) / elapsed),
            rss_kb=self.probe.rss_kb(), lost=0, connect_failures={}, media_in=0, marks_in=0,
            marks_answered=0, clears=0)

    def verdict(self, s: CallStep, unanswered_pings: int) -> str:
        why = []
        if s.opened < s.calls or s.connect_failures:
            why.append(f"{s.calls - s.opened} calls did not connect")
        if s.lost:
            why.append(f"{s.lost} calls lost")
        if s.dropped_ms:
            why.append(f"{s.dropped_ms:,.0f} ms of audio dropped")
        frac = s.accepted_fraction
        if frac is not None and frac < MIN_ACCEPTED:
            why.append(f"accepted {100.0 * frac:.2f}% of the audio sent")
        if s.server_cpu_pct > MAX_SERVER_CPU_PCT:
            why.append(f"server CPU {s.server_cpu_pct:.1f}%")
        if s.lag_p99_ms is not None and not s.lag_p99_ms < self.lag_limit_ms:
            why.append(f"ingest lag p99 {s.lag_p99_ms:.1f} ms")
        if not s.rtt.samples or not s.rtt.p99_ms < MAX_PING_RTT_P99_MS:
            why.append(f"ping RTT p99 {s.rtt.p99_ms:.1f} ms"
                       + (f" ({unanswered_pings} pings unanswered)" if unanswered_pings else ""))
        if why and s.gen_cpu_pct >= GENERATOR_BUSY_PCT:
            why.append(f"GENERATOR-BOUND? generator at {s.gen_cpu_pct:.0f}% CPU")
        return "; ".join(why)

    async def grow(self, k: int) -> None:
        """k new calls spread evenly over the ramp; each streams as soon as it is open."""
        ticks = max(1, round(self.ramp_s / RAMP_TICK_S))
        start = perf_counter()
        asked = 0
        for i in range(1, ticks + 1):
            group = round(k * i / ticks) - asked
            if group > 0:
                before = len(self.gen.clients)
                await self.gen.connect(group, TwilioCall, batch=max(group, self.batch))
                self.pacer.add(cast(list[RealtimeClient], self.gen.clients[before:]))
                asked += group
            await asyncio.sleep(max(0.0, start + i * RAMP_TICK_S - perf_counter()))


def format_call_step(s: CallStep) -> str:
    frac = s.accepted_fraction
    lag = "not measured" if s.lag_p99_ms is None else f"{s.lag_p99_ms:.1f} ms"
    return (f"{s.calls} calls ({s.opened} open): accepted "
            + ("-" if frac is None else f"{100.0 * frac:.2f}%")
            + f", dropped {s.dropped_ms or 0:,.0f} ms, ingest lag p99 {lag}, ping RTT p99 "
            f"{s.rtt.p99_ms:.1f} ms, server CPU {s.server_cpu_pct:.0f}%, generator CPU "
            f"{s.gen_cpu_pct:.0f}%: " + ("pass" if s.passed else f"FAIL ({s.why_not})"))

