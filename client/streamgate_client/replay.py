"""Replay a recorded session against a server and compare: the `streamgate replay` command.

    streamgate replay recording.jsonl --url ws://127.0.0.1:8765 [--speed 4]

A recording (made by a server for a session opened with ``record=true``; docs/recording.md) holds
the client's audio and messages with their times, and what the server answered. Replay opens
the same route with the same query (``record`` aside), sends the client's frames at their
recorded pace (``--speed N``: N times faster; audio never beyond the server's credit, where the
recorded client kept within it too), collects the answers and prints a diff of what came back
against what was recorded. What is compared (the rest is timing, not behaviour):

- every JSON message except ``credit``, ``usage``, ``checkpoint`` and ``metrics`` (when each is
  sent depends on wall-clock time), without the fields that name this one session
  (``session_id``, ``resume_token``, ``trace_id``, ``span_id``) or the wallet's state
  (``balance_micros``);
- interim transcripts only with ``--interims`` (how often they come depends on how audio
  reaches the engine); finals, their words and audio times always;
- binary frames (TTS audio) as the byte count of each run of frames between messages;
- the close code;
- for ASR, messages grouped per utterance (``speech_started``, transcripts, ``utterance_end``),
  so that an engine answering a little sooner or later than the next utterance starts is not
  a difference.

Exit codes: 0 the replay matches the recording, 1 it differs, 2 unusable recording or
arguments, 3 upgrade rejected (HTTP status), 5 cannot connect, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamgate_client.asr_client import API_KEY_ENV, dev_key
from streamgate_protocol import recording as fmt

__all__ = [
    "Comparison",
    "Received",
    "ReplayOptions",
    "canonical_lines",
    "compare",
    "main",
    "received_from_recording",
    "replay",
]

# Sent when wall-clock time says so, not because of what the client did.
TIMING_TYPES: Final = frozenset({"credit", "usage", "checkpoint", "metrics"})
# Name this one session (or the wallet's state at that moment), not its behaviour.
VOLATILE_FIELDS: Final = frozenset(
    {"session_id", "resume_token", "trace_id", "span_id", "balance_micros"})
UTTERANCE_TYPES: Final = frozenset({"speech_started", "transcript", "utterance_end"})
# Not replayed: asking the replaying server to record again is the caller's choice (--param).
NOT_REPLAYED_PARAMS: Final = frozenset({"record"})
EXIT_SAME, EXIT_DIFFERENT, EXIT_USAGE, EXIT_REJECTED, EXIT_CONNECT = 0, 1, 2, 3, 5


@dataclass(frozen=True)
class Audio:
    """A binary frame from the server (TTS audio): its size is what is compared."""

    size: int


@dataclass
class Received:
    """What a server sent in one session: JSON messages (decoded) and binary frames, in order,
    and the close code (None: no close seen)."""

    frames: list[dict[str, Any] | Audio] = field(default_factory=list)
    close_code: int | None = None


@dataclass(frozen=True)
class ReplayOptions:
    speed: float = 1.0
    params: Mapping[str, str] = field(default_factory=dict)  # query overrides (--param)
    key: str | None = None
    close_timeout_s: float = 30.0  # after the last frame sent, how long to wait for the close


def received_from_recording(recording: fmt.Recording) -> Received:
    out = Received()
    for event in recording.events:
        if isinstance(event, fmt.OutText):
            out.frames.append(json.loads(bytes(event.msg)))
        elif isinstance(event, fmt.OutBinary):
            out.frames.append(Audio(event.size))
        elif isinstance(event, fmt.Closed):
            out.close_code = event.code
    return out


def _canonical(message: dict[str, Any], ignored: frozenset[str]) -> str:
    kept = {k: _without(v, ignored) for k, v in message.items()
            if k not in VOLATILE_FIELDS and k not in ignored}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _without(value: Any, ignored: frozenset[str]) -> Any:
    """`value` without the ignored fields at any depth (a word's `confidence` in `words`)."""
    if not ignored:
        return value
    if isinstance(value, dict):
        return {k: _without(v, ignored) for k, v in value.items() if k not in ignored}
    if isinstance(value, list):
        return [_without(v, ignored) for v in value]
    return value


def canonical_lines(received: Received, *, kind: str, interims: bool = False,
                    ignore: Collection[str] = ()) -> list[str]:
    """What is compared, one line each (the module's docstring says what and why); fields
    named in `ignore` are left out of every message too."""
    ignored = frozenset(ignore)
    session: list[str] = []
    utterances: dict[int, list[str]] = {}
    speech_starts = 0
    audio_run = 0

    def end_audio_run() -> None:
        nonlocal audio_run
        if audio_run:
            session.append(f"audio {audio_run} bytes")
            audio_run = 0

    for frame in received.frames:
        if isinstance(frame, Audio):
            audio_run += frame.size
            continue
        kind_of = frame.get("type")
        if kind_of in TIMING_TYPES:
            continue
        end_audio_run()
        if kind_of == "transcript" and not frame.get("is_final", True) and not interims:
            continue
        if kind == "asr" and kind_of in UTTERANCE_TYPES:
            if kind_of == "speech_started":
                speech_starts += 1
                group = speech_starts
            else:
                group = int(frame.get("utterance_id", 0))
            utterances.setdefault(group, []).append(_canonical(frame, ignored))
            continue
        session.append(_canonical(frame, ignored))
    end_audio_run()
    lines = [f"session: {line}" for line in session]
    for group in sorted(utterances):
        lines.extend(f"utterance {group}: {line}" for line in utterances[group])
    lines.append(f"close {received.close_code}")
    return lines


@dataclass(frozen=True)
class Comparison:
    recorded: list[str]
    replayed: list[str]

    @property
    def same(self) -> bool:
        return self.recorded == self.replayed

    def diff(self) -> list[str]:
        return list(difflib.unified_diff(self.recorded, self.replayed, "recording", "replay",
                                         lineterm=""))


def compare(recording: fmt.Recording, replayed: Received, *, interims: bool = False,
            ignore: Collection[str] = ()) -> Comparison:
    kind = recording.header.kind
    return Comparison(
        canonical_lines(received_from_recording(recording), kind=kind, interims=interims,
                        ignore=ignore),
        canonical_lines(replayed, kind=kind, interims=interims, ignore=ignore))


def session_url(base_url: str, header: fmt.Header, params: Mapping[str, str]) -> str:
    """The recorded route on `base_url`'s server: its path unless the URL names one, the
    recorded query (without `record`) under the URL's own and `params` over both."""
    parts = urlsplit(base_url)
    path = parts.path if parts.path not in ("", "/") else header.path
    query = {k: v for k, v in header.query.items() if k not in NOT_REPLAYED_PARAMS}
    query.update(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query), ""))


class _Credit:
    """The audio the server allows now (ASR): the replay never sends beyond it where the
    recorded client did not."""

    def __init__(self) -> None:
        self.available = 0
        self.closed = False  # no more credit will come: stop waiting for it
        self.changed = asyncio.Event()

    def grant(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ready":
            self.available = int(message.get("credit_bytes", 0))
        elif kind == "credit":
            self.available += int(message.get("bytes", 0))
        else:
            return
        self.changed.set()

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    async def take(self, size: int) -> None:
        while self.available < size and not self.closed:
            self.changed.clear()
            await self.changed.wait()
        self.available -= size


def _within_recorded_credit(recording: fmt.Recording) -> list[bool]:
    """For each inbound binary event: whether the recorded client had the credit for it then
    (only those wait for credit in a replay; a client that ignored credit is replayed as it
    was)."""
    available = 0
    flags: list[bool] = []
    for event in recording.events:
        if isinstance(event, fmt.OutText):
            message = json.loads(bytes(event.msg))
            if message.get("type") == "ready":
                available = int(message.get("credit_bytes", 0))
            elif message.get("type") == "credit":
                available += int(message.get("bytes", 0))
        elif isinstance(event, fmt.InBinary):
            flags.append(available >= len(event.data))
            available -= len(event.data)
    return flags


async def _receive(ws: ClientConnection, into: Received, credit: _Credit) -> None:
    try:
        async for message in ws:
            if isinstance(message, bytes):
                into.frames.append(Audio(len(message)))
                continue
            try:
                decoded = json.loads(message)
            except ValueError:
                decoded = {"type": "(not JSON)", "text": message[:200]}
            if not isinstance(decoded, dict):
                decoded = {"type": "(not an object)", "value": decoded}
            into.frames.append(decoded)
            credit.grant(decoded)
    except ConnectionClosed:
        pass
    finally:
        credit.close()


async def replay(recording: fmt.Recording, base_url: str,
                 options: ReplayOptions = ReplayOptions()) -> Received:
    """Play `recording`'s client side against the server at `base_url`; what it sent back.
    Raises websockets' InvalidStatus when the upgrade is refused, OSError when the server
    cannot be reached."""
    url = session_url(base_url, recording.header, options.params)
    headers = {"Authorization": f"Bearer {options.key}"} if options.key else {}
    received = Received()
    credit = _Credit()
    gated = iter(_within_recorded_credit(recording))
    asr = recording.header.kind == "asr"
    server_closes = any(isinstance(e, fmt.CloseSent) for e in recording.events)
    speed = options.speed
    async with connect(url, additional_headers=headers, max_size=None,
                       open_timeout=10) as ws:
        receiver = asyncio.create_task(_receive(ws, received, credit))
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            for event in recording.events:
                if isinstance(event, fmt.InText | fmt.InBinary | fmt.Closed):
                    delay = start + event.t_ms / 1000.0 / speed - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if receiver.done():
                    break  # the server closed: nothing more can be sent
                if isinstance(event, fmt.InText):
                    await ws.send(event.text)
                elif isinstance(event, fmt.InBinary):
                    if asr and next(gated, False):
                        await credit.take(len(event.data))
                    await ws.send(event.data)
                elif isinstance(event, fmt.Closed) and not server_closes:
                    # The recorded client closed the socket itself, with this code.
                    await ws.close(event.code if event.code in range(1000, 5000) else 1000)
            await asyncio.wait_for(asyncio.shield(receiver), options.close_timeout_s)
        except TimeoutError:
            await ws.close(1000)
        except ConnectionClosed:
            pass
        finally:
            await receiver
        received.close_code = ws.close_code
    return received


# --- command line ---------------------------------------------------------------------------


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1000:
        raise argparse.ArgumentTypeError("must be above 0 and at most 1000")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `streamgate replay`."""
    parser.add_argument("file", type=Path, metavar="FILE", help="a recording (.jsonl)")
    parser.add_argument("--url", default="ws://127.0.0.1:8765",
                        help="the server to replay against; its path, if any, replaces the "
                        "recorded one (default ws://127.0.0.1:8765)")
    parser.add_argument("--speed", type=_speed, default=1.0,
                        help="play N times faster than recorded (default 1: recorded pace)")
    parser.add_argument("--param", type=_param, action="append", default=[],
                        metavar="NAME=VALUE",
                        help="set a query parameter of the replayed session (repeatable), "
                        "e.g. --param endpointing_ms=300")
    parser.add_argument("--key", default=None,
                        help=f"API key (default: ${API_KEY_ENV}, or for a local server the dev "
                        "key `streamgate serve` saved)")
    parser.add_argument("--interims", action="store_true",
                        help="compare interim transcripts too (they depend on timing)")
    parser.add_argument("--ignore", action="append", default=[], metavar="FIELD",
                        help="leave this field out of every compared message, at any depth "
                        "(repeatable), e.g. --ignore confidence for an engine whose "
                        "confidences vary")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for the server to close after the last frame")


def main(args: argparse.Namespace) -> int:
    try:
        recording = fmt.read_recording(args.file)
    except (OSError, fmt.RecordingFormatError) as exc:
        print(f"streamgate replay: {args.file}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    key = args.key or os.environ.get(API_KEY_ENV) or dev_key(args.url)
    options = ReplayOptions(speed=args.speed, params=dict(args.param), key=key,
                            close_timeout_s=args.timeout)
    started = time.monotonic()
    try:
        replayed = asyncio.run(replay(recording, args.url, options))
    except InvalidStatus as exc:
        body = exc.response.body.decode("utf-8", "replace") if exc.response.body else ""
        print(f"streamgate replay: upgrade rejected: HTTP {exc.response.status_code} {body}",
              file=sys.stderr)
        return EXIT_REJECTED
    except OSError as exc:
        print(f"streamgate replay: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    except KeyboardInterrupt:
        return 130
    result = compare(recording, replayed, interims=args.interims, ignore=args.ignore)
    took = time.monotonic() - started
    if not recording.complete:
        print("note: the recording has no end (its server stopped mid-session, or it is cut)",
              file=sys.stderr)
    if any(isinstance(e, fmt.Truncated) for e in recording.events):
        print("note: the recording reached its size bound (recording.max_bytes): only the part "
              "it holds was replayed, and what the server did after that point is not in it",
              file=sys.stderr)
    if result.same:
        print(f"same: {len(result.recorded)} compared lines ({took:.2f} s)")
        return EXIT_SAME
    for line in result.diff():
        print(line)
    print(f"different ({took:.2f} s)", file=sys.stderr)
    return EXIT_DIFFERENT


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamgate-replay", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_cli())
