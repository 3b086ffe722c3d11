"""A phone call as Twilio Media Streams would place it: the `streamgate call-sim` command.

    streamgate call-sim hello.wav --url ws://127.0.0.1:8765/v1/telephony/twilio --dtmf 12#

What it does, as Twilio does (twilio.com/docs/voice/media-streams/websocket-messages):

1. Connects with no headers (Twilio cannot set any); the key goes in the `start` event's
   `customParameters.api_key`, as a `<Stream><Parameter name="api_key">` would put it.
2. Sends `connected`, `start` (streamSid, callSid, tracks, customParameters, mediaFormat
   audio/x-mulaw 8 kHz mono), then `media` every 20 ms at real-time pace all call long: the
   WAV's audio, then silence (a phone line never goes quiet on the wire).
3. Plays the agent's audio out at real time and echoes each `mark` once the audio before it has
   finished playing. `clear` drops the audio not played yet and echoes its pending marks at once.
4. After the caller's speech (and the agent's answer), sends the `--dtmf` digits, waits for
   that answer, then sends `stop` and waits for the server to close (1000).

The server sends no transcripts on this protocol, so what is printed is the call as the caller
experiences it: when the agent spoke, for how long, what was cut off by `clear`. `--out` saves
the agent audio that was played (16-bit PCM WAV, 8 kHz).

Exit codes: 0 normal close (1000), 2 unusable input, 3 upgrade rejected, 4 abnormal close,
5 cannot connect, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import sys
import time
import uuid
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from streamgate_client.asr_client import (
    API_KEY_ENV,
    CLOSE_CODE_NAMES,
    AudioInputError,
    dev_key,
    load_audio,
)
from streamgate_protocol.audio import ulaw_to_pcm16

__all__ = ["DEFAULT_URL", "CallSim", "add_arguments", "main"]

DEFAULT_URL: Final = "ws://127.0.0.1:8765/v1/telephony/twilio"
RATE: Final = 8000
FRAME: Final = 160  # 20 ms of 8 kHz mu-law: Twilio's media message size
FRAME_S: Final = 0.02
SILENCE: Final = b"\xff" * FRAME  # mu-law zero


@dataclass
class _Utterance:
    """One stretch of agent audio, from the first media after quiet to the queue running dry."""

    started: float
    played_ms: float = 0.0
    dropped_ms: float = 0.0
    marks: int = 0


@dataclass
class CallSim:
    url: str
    audio: bytes  # caller audio, mu-law 8 kHz
    key: str | None = None
    dtmf: str = ""
    reply_wait_s: float = 4.0  # how long to wait for the agent to start answering
    quiet_s: float = 0.6  # agent silent this long after playing = its turn is over
    close_timeout_s: float = 15.0
    out: TextIO = sys.stdout
    on_message: Callable[[dict[str, Any]], None] | None = None  # every server message (tests)
    stream_sid: str = field(default_factory=lambda: "MZ" + uuid.uuid4().hex)
    call_sid: str = field(default_factory=lambda: "CA" + uuid.uuid4().hex)
    # results
    played: bytearray = field(default_factory=bytearray)  # agent audio heard (mu-law)
    utterances: list[_Utterance] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    marks_echoed: int = 0
    clears: int = 0

    def __post_init__(self) -> None:
        self._ws: ClientConnection | None = None
        self._seq = 0
        self._t0 = time.monotonic()
        self._caller: deque[bytes] = deque(
            self.audio[i:i + FRAME] for i in range(0, len(self.audio), FRAME))
        self._queue: deque[bytes | str] = deque()  # agent audio and marks, in arrival order
        self._wake = asyncio.Event()
        self._cleared = asyncio.Event()
        self._current: _Utterance | None = None
        self._heard = asyncio.Event()  # agent audio was played
        self._caller_done = asyncio.Event()

    # --- output ---------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        print(f"[{time.monotonic() - self._t0:6.2f}s] {text}", file=self.out, flush=True)

    # --- wire -----------------------------------------------------------------------------------

    async def _send(self, event: str, body: dict[str, Any] | None = None) -> None:
        assert self._ws is not None
        self._seq += 1
        msg: dict[str, Any] = {"event": event, "sequenceNumber": str(self._seq),
                               "streamSid": self.stream_sid}
        if body is not None:
            msg[event] = body
        await self._ws.send(json.dumps(msg))

    async def run(self) -> int:
        """Place the call; returns the server's close code."""
        async with connect(self.url, max_size=2**20, open_timeout=10) as ws:
            self._ws = ws
            self._t0 = time.monotonic()
            await ws.send(json.dumps({"event": "connected", "protocol": "Call",
                                      "version": "1.0.0"}))
            params = {"api_key": self.key} if self.key else {}
            await self._send("start", {
                "streamSid": self.stream_sid, "callSid": self.call_sid,
                "accountSid": "AC" + "0" * 32, "tracks": ["inbound"],
                "customParameters": params,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
            })
            self._say(f"call started: callSid {self.call_sid}")
            self._say(f"caller: speaking ({len(self.audio) / RATE:.2f} s of audio)")
            tasks = [asyncio.create_task(c) for c in
                     (self._receive(), self._player(), self._media())]
            try:
                await self._script()
                tasks[2].cancel()  # the line goes quiet: no media after `stop`
                await self._send("stop", {"accountSid": "AC" + "0" * 32,
                                          "callSid": self.call_sid})
                self._say("caller: hung up (stop)")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.close_timeout_s):
                        await ws.wait_closed()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            self.close_code = ws.close_code
            self.close_reason = ws.close_reason or ""
        self._summary()
        return self.close_code if self.close_code is not None else 1006

    async def _script(self) -> None:
        await self._caller_done.wait()
        await self._agent_turn()
        if self.dtmf:
            self._say(f"caller: pressing {self.dtmf}")
            for digit in self.dtmf:
                await self._send("dtmf", {"track": "inbound_track", "digit": digit})
                await asyncio.sleep(0.15)  # a key press and the gap to the next one
            await self._agent_turn()

    async def _agent_turn(self) -> None:
        """Wait for the agent to answer (up to reply_wait_s) and finish playing its answer."""
        self._heard.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.reply_wait_s):
                await self._heard.wait()
        while True:  # until the agent has been quiet for quiet_s
            self._heard.clear()
            try:
                async with asyncio.timeout(self.quiet_s):
                    await self._heard.wait()
            except TimeoutError:
                if not self._queue:
                    return

    async def _media(self) -> None:
        """20 ms frames at real time for the whole call: the caller's audio, then silence."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while True:
            frame = self._caller.popleft() if self._caller else SILENCE
            if not self._caller:
                self._caller_done.set()
            frame = frame.ljust(FRAME, b"\xff")
            await self._send("media", {"track": "inbound", "chunk": str(n + 1),
                                       "timestamp": str(n * 20),
                                       "payload": base64.b64encode(frame).decode()})
            n += 1
            await asyncio.sleep(max(0.0, start + n * FRAME_S - loop.time()))

    async def _receive(self) -> None:
        assert self._ws is not None
        with contextlib.suppress(ConnectionClosed):
            async for raw in self._ws:
                msg = json.loads(raw)
                if self.on_message is not None:
                    self.on_message(msg)
                event = msg.get("event")
                if event == "media":
                    self._queue.append(base64.b64decode(msg["media"]["payload"]))
                    self._wake.set()
                elif event == "mark":
                    self._queue.append(msg["mark"]["name"])
                    self._wake.set()
                elif event == "clear":
                    await self._clear()

    async def _clear(self) -> None:
        """Drop what has not been played; echo its marks at once (Twilio does)."""
        self.clears += 1
        self._cleared.set()
        dropped = 0
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, str):
                await self._echo(item)
            else:
                dropped += len(item)
        if self._current is not None:
            self._current.dropped_ms += dropped * 1000 / RATE
        self._say(f"agent: interrupted (clear), {dropped * 1000 // RATE} ms not played")

    async def _echo(self, name: str) -> None:
        await self._send("mark", {"name": name})
        self.marks_echoed += 1
        if self._current is not None:
            self._current.marks += 1

    async def _player(self) -> None:
        """Real-time playout: audio takes its duration; a mark is echoed when reached."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._current is not None:
                    self._end_utterance()
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._queue.popleft()
            if isinstance(item, str):
                await self._echo(item)
                continue
            if self._current is None:
                self._current = _Utterance(started=time.monotonic() - self._t0)
                self._say("agent: speaking")
            self._cleared.clear()
            started = loop.time()
            duration = len(item) / RATE
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cleared.wait(), duration)
            heard = min(len(item), int((loop.time() - started) * RATE))
            self.played += item[:heard]
            self._current.played_ms += heard * 1000 / RATE
            if self._cleared.is_set():
                self._current.dropped_ms += (len(item) - heard) * 1000 / RATE
            self._heard.set()

    def _end_utterance(self) -> None:
        u, self._current = self._current, None
        if u is None:
            return
        self.utterances.append(u)
        cut = f", {u.dropped_ms / 1000:.2f} s cut off" if u.dropped_ms else ""
        self._say(f"agent: done, {u.played_ms / 1000:.2f} s played{cut} ({u.marks} marks)")

    def _summary(self) -> None:
        if self._current is not None:
            self._end_utterance()
        code = self.close_code
        name = CLOSE_CODE_NAMES.get(code or 1006, "unexpected close")
        self._say(f"call ended: close {code} ({name}); agent spoke {len(self.utterances)} "
                  f"time(s), {len(self.played) / RATE:.2f} s heard, {self.marks_echoed} marks "
                  f"echoed, {self.clears} clear(s)")

    def save(self, path: Path) -> None:
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(RATE)
            wav.writeframes(ulaw_to_pcm16(bytes(self.played)).astype("<i2").tobytes())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `streamgate call-sim`."""
    parser.add_argument("file", type=Path, metavar="WAV",
                        help="what the caller says: a 16-bit PCM WAV file (any rate/channels)")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"telephony endpoint (default {DEFAULT_URL})")
    parser.add_argument(
        "--key", default=None,
        help=f"API key, sent in the start event's customParameters.api_key (default: "
        f"${API_KEY_ENV}, or for a local server the dev key `streamgate serve` saved)")
    parser.add_argument("--dtmf", default="", help="keypad digits to press after speaking")
    parser.add_argument("--reply-wait", type=float, default=4.0,
                        help="seconds to wait for the agent to start answering (default 4)")
    parser.add_argument("--out", type=Path, default=None,
                        help="save the agent audio that was played to this WAV file")


def main(args: argparse.Namespace) -> int:
    """Run `streamgate call-sim` with parsed arguments; returns the process exit code."""
    prog = "streamgate call-sim"
    err = sys.stderr
    try:
        audio = load_audio(args.file, encoding="mulaw", sample_rate=RATE)
    except AudioInputError as exc:
        print(f"{prog}: {exc}", file=err)
        return 2
    if any(d not in "0123456789*#" for d in args.dtmf):
        print(f"{prog}: --dtmf takes digits 0-9, * and #", file=err)
        return 2
    key = args.key or os.environ.get(API_KEY_ENV) or dev_key(args.url)
    sim = CallSim(args.url, audio.data, key=key, dtmf=args.dtmf, reply_wait_s=args.reply_wait)
    try:
        code = asyncio.run(sim.run())
    except InvalidStatus as exc:
        print(f"{prog}: the server rejected the connection: HTTP "
              f"{exc.response.status_code}", file=err)
        return 3
    except (OSError, TimeoutError, WebSocketException) as exc:
        print(f"{prog}: cannot connect to {args.url}: {exc}", file=err)
        return 5
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=err)
        return 130
    if args.out is not None:
        sim.save(args.out)
        print(f"agent audio saved to {args.out}", file=err)
    if code != 1000:
        reason = f": {sim.close_reason}" if sim.close_reason else ""
        print(f"{prog}: connection closed with code {code} "
              f"({CLOSE_CODE_NAMES.get(code, 'unexpected close')}){reason}", file=err)
        return 4
    return 0


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamgate_client.call_sim",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_cli())
