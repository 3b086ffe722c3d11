"""Streaming speech-to-text client for streamgate: the `streamgate asr` command and example code.

    streamgate asr speech.wav --url ws://127.0.0.1:8765/v1/asr/stream --realtime

What a well-behaved client does (docs/protocol.md is the contract):

1. Connect to ``/v1/asr/stream`` with the session parameters in the query string and the API key
   in ``Authorization: Bearer <key>``. A rejected upgrade is a plain HTTP response whose JSON
   body is ``{"error": {"code", "message"}}``.
2. Wait for ``ready``. Its ``credit_bytes`` is the initial send window; every later ``credit``
   message adds ``bytes`` to it. Never have more bytes sent than granted in total: this is the
   back pressure that keeps the server's memory bounded.
3. Send binary frames of ``chunk_ms`` of audio (paced at real time with ``--realtime``, as a live
   microphone or phone call would be), then ``{"type": "close"}``.
4. Keep reading: the server flushes the last finals, sends ``summary`` and closes with 1000.
5. If the connection is cut (the server drains: ``error`` ``draining`` and 1001; the network or
   the node fails: no close frame), reconnect within ``ready.limits``' resume window with
   ``resume_token`` (from ``ready``) and ``last_utterance_id`` (the newest final received),
   through the same load balancer or to another node: the new ``ready`` says from which byte
   (``resume_offset``) to send the audio again; finals the client missed are replayed first,
   and none it has is sent twice (docs/protocol.md, "Resuming a session").

The reusable piece is :func:`stream_audio`; :func:`add_arguments` and :func:`main` are the CLI.
Exit codes of :func:`main`: 0 normal close (1000), 2 unusable input or arguments, 3 upgrade
rejected (HTTP status), 4 abnormal close (code other than 1000), 5 cannot connect, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
import wave
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import numpy as np
import numpy.typing as npt
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.http11 import Response

from streamgate_protocol.audio import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AudioFormatError,
    StreamDecoder,
    pcm16_to_alaw,
    pcm16_to_ulaw,
    wav_header,
)
from streamgate_protocol.messages import (
    Close,
    Credit,
    Error,
    KeepAlive,
    Ready,
    SpeechStarted,
    Summary,
    Transcript,
    Usage,
    UtteranceEnd,
    Warning,
    asr_server_decoder,
    encoder,
)

__all__ = [
    "DEFAULT_URL",
    "AbnormalClose",
    "AsrClientError",
    "AudioInputError",
    "PreparedAudio",
    "Rejected",
    "add_arguments",
    "load_audio",
    "main",
    "stream_audio",
]

DEFAULT_URL: Final = "ws://127.0.0.1:8765/v1/asr/stream"
API_KEY_ENV: Final = "STREAMGATE_API_KEY"
ENCODINGS: Final = ("pcm_s16le", "mulaw", "alaw", "wav")

# `streamgate serve` with embedded Redis/PostgreSQL saves its dev tenant's key here.
DEV_KEY_FILE: Final = Path(".streamgate") / "dev-api-key"

READY_TIMEOUT_S: Final = 10.0
# A cut session is resumed this many times at most, the first retry at once and then with a
# growing pause: a node that died leaves its sessions to the others within a few seconds.
RESUME_ATTEMPTS: Final = 8
RESUME_BACKOFF_S: Final = (0.0, 0.1, 0.25, 0.5, 1.0, 1.0, 2.0, 2.0)
# While the server withholds credit the client sends nothing; a keepalive every few seconds keeps
# the session clear of the server's idle timeout (default 10 s).
KEEPALIVE_EVERY_S: Final = 4.0

_CLOSE_FRAME: Final = encoder.encode(Close()).decode()
_KEEPALIVE_FRAME: Final = encoder.encode(KeepAlive()).decode()

CLOSE_CODE_NAMES: Final[Mapping[int, str]] = {
    1000: "normal",
    1001: "server draining, reconnect",
    4409: "session resumed on another connection",
    1006: "connection lost without a close frame",
    1008: "policy violation",
    1009: "frame too big",
    1011: "internal server error",
    4001: "unauthorized",
    4002: "insufficient balance",
    4008: "idle timeout",
    4029: "rate limited",
    4400: "bad config",
}


# --- errors -------------------------------------------------------------------------------------


class AsrClientError(Exception):
    """Base class of the errors :func:`stream_audio` raises on purpose."""


class Rejected(AsrClientError):
    """The server refused the WebSocket upgrade with an HTTP error response."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: str | None, body: bytes
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.body = body
        super().__init__(f"HTTP {status} {code}: {message}")

    @classmethod
    def from_response(cls, response: Response) -> Rejected:
        body = bytes(response.body)
        code, message = "", body.decode("utf-8", "replace").strip()[:500]
        try:
            parsed = msgspec.json.decode(body)
        except msgspec.DecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            code = str(parsed["error"].get("code", ""))
            message = str(parsed["error"].get("message", ""))
        return cls(
            response.status_code,
            code or response.reason_phrase or "rejected",
            message,
            response.headers.get("Retry-After"),
            body,
        )


class AbnormalClose(AsrClientError):
    """The session ended with a close code other than 1000 (or without a close frame)."""

    def __init__(self, code: int, reason: str, messages: list[object]) -> None:
        self.code = code
        self.reason = reason
        self.messages = messages  # everything received before the close
        name = CLOSE_CODE_NAMES.get(code, "unexpected close")
        super().__init__(f"closed with code {code} ({name})" + (f": {reason}" if reason else ""))


class AudioInputError(AsrClientError):
    """The input file cannot be read or converted as requested."""


# --- streaming ----------------------------------------------------------------------------------


class _Window:
    """Send window: the client may have sent at most ``granted`` bytes in total."""

    def __init__(self) -> None:
        self.granted = 0
        self.sent = 0
        self.max_frame_bytes: int | None = None
        self.ready = False
        self.closed = False  # the reader has seen the end of the connection
        self.changed = asyncio.Event()  # set on every grant, on ready and on close

    def notify(self) -> None:
        self.changed.set()

    async def wait_changed(self, wait_s: float) -> bool:
        """Wait for the next change; False on timeout. Callers re-check their condition."""
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), wait_s)
        except TimeoutError:
            return False
        return True


def _decode(raw: str) -> object:
    """A typed message; a plain dict for well-formed JSON this client does not know (newer
    server, extra message types); the raw text if it is not JSON at all."""
    try:
        return asr_server_decoder.decode(raw)
    except msgspec.DecodeError:
        pass
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw


def _int_field(msg: object, kind: str, field: str) -> int | None:
    if isinstance(msg, dict) and msg.get("type") == kind:
        value = msg.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


async def _read_messages(
    ws: ClientConnection,
    window: _Window,
    messages: list[object],
    on_event: Callable[[object], None] | None,
) -> None:
    try:
        async for raw in ws:
            if isinstance(raw, bytes):
                continue  # the ASR stream never sends audio; ignore rather than fail
            msg = _decode(raw)
            messages.append(msg)
            if isinstance(msg, Ready):
                window.granted += msg.credit_bytes
                window.max_frame_bytes = msg.limits.max_frame_bytes
                window.ready = True
            elif isinstance(msg, Credit):
                window.granted += msg.bytes
            elif (credit := _int_field(msg, "ready", "credit_bytes")) is not None:
                window.granted += credit  # a ready this client could not fully type-check
                window.ready = True
            elif (credit := _int_field(msg, "credit", "bytes")) is not None:
                window.granted += credit
            window.notify()
            if on_event is not None:
                on_event(msg)
    except ConnectionClosed:
        pass  # the close code is read from the connection afterwards
    finally:
        window.closed = True
        window.notify()


async def _wait_for_credit(ws: ClientConnection, window: _Window, need: int) -> int | None:
    """Bytes that may be sent now (at least ``need``), or None once the connection is gone."""
    while True:
        available = window.granted - window.sent
        if available >= need:
            return available
        if window.closed:
            return None
        if not await window.wait_changed(KEEPALIVE_EVERY_S) and not window.closed:
            await ws.send(_KEEPALIVE_FRAME)


async def _send_audio(
    ws: ClientConnection,
    window: _Window,
    audio: bytes,
    *,
    chunk_bytes: int,
    align: int,
    bytes_per_second: int,
    realtime: bool,
    start_offset: int = 0,
    started_at: float | None = None,
) -> bool:
    """Send the audio from byte `start_offset` within the window; False if the connection
    ended first. Real-time pacing runs from `started_at` (the session's first connection)."""
    view = memoryview(audio)
    start = time.monotonic() if started_at is None else started_at
    for offset in range(start_offset, len(audio), chunk_bytes):
        if realtime:
            # Absolute schedule: the chunk starting at byte `offset` is due when that much audio
            # would have been captured live. Late chunks (credit stalls) go out at once.
            delay = start + offset / bytes_per_second - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        chunk = view[offset : offset + chunk_bytes]
        while len(chunk):
            need = min(len(chunk), align)
            available = await _wait_for_credit(ws, window, need)
            if available is None:
                return False
            n = len(chunk)
            if available < n:
                # Part of the chunk now, the rest when credit arrives: waiting for room for a
                # whole chunk could deadlock a window smaller than one chunk.
                n = available - available % align
            await ws.send(bytes(chunk[:n]))
            window.sent += n
            chunk = chunk[n:]
    return True


def _bytes_per_sample(encoding: str) -> int:
    if encoding in ("pcm_s16le", "wav"):
        return 2
    if encoding in ("mulaw", "alaw"):
        return 1
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")


def _with_query(url: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass
class _Resume:
    """What a client needs to carry a cut session on: the token, the newest final it has, and
    where in its audio the server said to continue."""

    token: str = ""
    last_utterance_id: int = 0
    offset: int = 0

    def seen(self, msg: object) -> None:
        if isinstance(msg, Ready):
            self.token = msg.resume_token
            self.offset = msg.resume_offset
        elif isinstance(msg, Transcript) and msg.is_final:
            self.last_utterance_id = max(self.last_utterance_id, msg.utterance_id)


async def stream_audio(
    url: str,
    audio: bytes,
    *,
    encoding: str,
    sample_rate: int,
    key: str | None,
    realtime: bool,
    chunk_ms: int = 20,
    on_event: Callable[[object], None] | None = None,
    extra_params: dict[str, str] | None = None,
    resume: bool = True,
    resume_urls: Sequence[str] = (),
) -> list[object]:
    """Stream ``audio`` (already in ``encoding`` at ``sample_rate``, mono) to an ASR endpoint.

    Honours the credit window, sends ``close`` after the audio and returns every server message
    in order (msgspec Structs from :mod:`streamgate_protocol.messages`; a dict for a message type
    this client does not know) once the server has closed with 1000. ``on_event`` sees each
    message as it arrives. ``extra_params`` are further query parameters (``model``,
    ``language``, ``interim_results``, ``endpointing_ms``, ``vad``, ``overflow``).

    With ``resume`` (the default) a session cut off by a drain (1001) or a lost connection is
    resumed, on ``url`` (a load balancer) or on the next of ``resume_urls`` (other nodes), and
    the messages of every connection are returned as one session's.

    Raises :class:`Rejected` if the upgrade is refused, :class:`AbnormalClose` for any other
    close code, and ``OSError``/``TimeoutError``/``WebSocketException`` if it cannot connect.
    For ``encoding="wav"`` the header is part of ``audio`` and pacing assumes 16-bit mono.
    """
    if chunk_ms < 1:
        raise ValueError("chunk_ms must be at least 1")
    align = _bytes_per_sample(encoding)
    bytes_per_second = align * sample_rate
    chunk_bytes = max(align, bytes_per_second * chunk_ms // 1000 // align * align)

    params = dict(extra_params or {})
    params.update(encoding=encoding, sample_rate=str(sample_rate))
    headers = {"Authorization": f"Bearer {key}"} if key else None
    state = _Resume()
    targets = [url, *resume_urls]
    messages: list[object] = []
    started_at = time.monotonic()

    def seen(msg: object) -> None:
        state.seen(msg)
        if on_event is not None:
            on_event(msg)

    attempt = 0
    while True:
        if attempt == 0:
            target, query = url, params
        else:
            target = targets[(attempt - 1) % len(targets)] if len(targets) > 1 else url
            query = {"resume_token": state.token,
                     "last_utterance_id": str(state.last_utterance_id)}
        try:
            code, reason = await _one_connection(
                _with_query(target, query), headers, audio, state, messages, seen,
                chunk_bytes=chunk_bytes, align=align, bytes_per_second=bytes_per_second,
                realtime=realtime, started_at=started_at)
        except (Rejected, OSError, TimeoutError, WebSocketException) as exc:
            # A resume that lands on a node that is draining or gone: try again (elsewhere).
            retry = attempt > 0 and (not isinstance(exc, Rejected) or exc.status >= 500)
            if not retry or attempt >= RESUME_ATTEMPTS:
                raise
            code, reason = 1006, str(exc)
        if code == 1000:
            return messages
        if not (resume and state.token and code in (1001, 1006)) or attempt >= RESUME_ATTEMPTS:
            raise AbnormalClose(code, reason, messages)
        await asyncio.sleep(RESUME_BACKOFF_S[min(attempt, len(RESUME_BACKOFF_S) - 1)])
        attempt += 1


async def _one_connection(
    url: str,
    headers: dict[str, str] | None,
    audio: bytes,
    state: _Resume,
    messages: list[object],
    on_event: Callable[[object], None],
    *,
    chunk_bytes: int,
    align: int,
    bytes_per_second: int,
    realtime: bool,
    started_at: float,
) -> tuple[int, str]:
    """One connection of a session, from `ready` (its `resume_offset`) to the close."""
    try:
        # Audio does not compress with deflate; compression would only cost CPU on both ends.
        ws = await connect(url, additional_headers=headers, compression=None)
    except InvalidStatus as exc:
        raise Rejected.from_response(exc.response) from exc

    window = _Window()
    async with ws:
        reader = asyncio.create_task(_read_messages(ws, window, messages, on_event))
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not (window.ready or window.closed):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AsrClientError(f"no 'ready' from the server within {READY_TIMEOUT_S} s")
                await window.wait_changed(remaining)
            if window.ready and not window.closed:
                if window.max_frame_bytes:
                    limit = window.max_frame_bytes - window.max_frame_bytes % align
                    chunk_bytes = max(align, min(chunk_bytes, limit))
                sent_all = await _send_audio(
                    ws,
                    window,
                    audio,
                    chunk_bytes=chunk_bytes,
                    align=align,
                    bytes_per_second=bytes_per_second,
                    realtime=realtime,
                    start_offset=state.offset,
                    started_at=started_at,
                )
                if sent_all:
                    await ws.send(_CLOSE_FRAME)
        except ConnectionClosed:
            pass  # the server closed while we were sending; the reader has the close code
        except BaseException:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            raise
        await reader  # until the server closes (after `summary`); re-raises on_event errors
    return (ws.close_code if ws.close_code is not None else 1006), ws.close_reason or ""


# --- audio input ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedAudio:
    data: bytes
    encoding: str
    sample_rate: int

    @property
    def duration_ms(self) -> int:
        return len(self.data) * 1000 // (_bytes_per_sample(self.encoding) * self.sample_rate)


def _read_wav(path: Path) -> tuple[npt.NDArray[np.int16], int]:
    """Mono int16 samples and the sample rate of a 16-bit PCM WAV file."""
    try:
        with wave.open(str(path), "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        # Python 3.11's wave rejects WAVE_FORMAT_EXTENSIBLE (and G.711) headers, which the
        # server's own streaming decoder understands: use that before giving up.
        decoder = StreamDecoder("wav", MIN_SAMPLE_RATE, max_header_bytes=1 << 20)
        try:
            samples = decoder.decode(path.read_bytes())
        except AudioFormatError as fallback_exc:
            raise AudioInputError(
                f"{path}: not a WAV file this client can read ({exc}; {fallback_exc}); convert "
                "it to 16-bit PCM, e.g. with `sox in.wav -b 16 -e signed out.wav`"
            ) from exc
        if not decoder.header_complete:
            raise AudioInputError(f"{path}: truncated WAV file ({exc})") from exc
        return samples, decoder.sample_rate
    if width != 2:
        raise AudioInputError(f"{path}: {8 * width}-bit samples; only 16-bit PCM is supported")
    samples = np.frombuffer(frames, dtype="<i2")
    samples = samples[: len(samples) - len(samples) % channels]
    if channels > 1:
        # Same downmix as the server's decoder: floor of the channel mean.
        mixed = samples.reshape(-1, channels).sum(axis=1, dtype=np.int32) // channels
        return mixed.astype(np.int16), rate
    return samples.astype(np.int16), rate


def load_audio(
    path: Path, *, encoding: str | None = None, sample_rate: int | None = None
) -> PreparedAudio:
    """Read ``path`` and make it ready to stream.

    A WAV file (16-bit PCM, any rate and channel count) is downmixed to mono, resampled to
    ``sample_rate`` if given, and encoded as ``encoding`` (default ``pcm_s16le``; ``mulaw`` and
    ``alaw`` simulate telephony audio; ``wav`` re-wraps the mono PCM in a WAV header).
    Any other file is raw audio already in ``encoding`` at ``sample_rate`` and is sent unchanged.
    """
    if encoding is not None and encoding not in ENCODINGS:
        raise AudioInputError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")
    try:
        with path.open("rb") as fh:
            head = fh.read(12)
    except OSError as exc:
        raise AudioInputError(f"cannot read {path}: {exc.strerror or exc}") from exc

    if len(head) == 12 and head[:4] == b"RIFF" and head[8:] == b"WAVE":
        samples, rate = _read_wav(path)
        target = sample_rate or rate
        if not MIN_SAMPLE_RATE <= target <= MAX_SAMPLE_RATE:
            raise AudioInputError(
                f"{path}: {target} Hz is outside the server's {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE}"
                " Hz range; pass --sample-rate to resample"
            )
        if target != rate:
            samples = np.asarray(soxr.resample(samples, rate, target), dtype=np.int16)
        enc = encoding or "pcm_s16le"
        if enc == "mulaw":
            data = pcm16_to_ulaw(samples)
        elif enc == "alaw":
            data = pcm16_to_alaw(samples)
        else:
            data = samples.astype("<i2").tobytes()
            if enc == "wav":
                data = wav_header(target, 1, len(samples)) + data
        return PreparedAudio(data, enc, target)

    enc = encoding or "pcm_s16le"
    if enc == "wav":
        raise AudioInputError(f"{path}: --encoding wav given but the file is not a RIFF/WAVE file")
    if sample_rate is None:
        raise AudioInputError(
            f"{path}: not a WAV file; for raw audio give --sample-rate (and --encoding if it is "
            "not pcm_s16le)"
        )
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioInputError(
            f"--sample-rate {sample_rate} is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )
    return PreparedAudio(path.read_bytes(), enc, sample_rate)


# --- output -------------------------------------------------------------------------------------


def _seconds(ms: int) -> str:
    """Milliseconds as seconds with two decimals (truncated), without float rounding."""
    sign = "-" if ms < 0 else ""
    whole, frac = divmod(abs(ms), 1000)
    return f"{sign}{whole}.{frac // 10:02d}"


class _Printer:
    """Human-readable (or JSON lines) rendering of server messages as they arrive."""

    def __init__(self, out: IO[str], err: IO[str], *, json_lines: bool, verbose: bool) -> None:
        self.out = out
        self.err = err
        self.json_lines = json_lines
        self.verbose = verbose
        self.tty = out.isatty()
        self._interim_shown = False

    def _clear_interim(self) -> None:
        if self._interim_shown:
            self.out.write("\r\x1b[2K")
            self.out.flush()
            self._interim_shown = False

    def line(self, text: str, *, err: bool = False) -> None:
        self._clear_interim()
        stream = self.err if err else self.out
        print(text, file=stream, flush=True)

    def finish(self) -> None:
        self._clear_interim()

    def __call__(self, msg: object) -> None:
        if isinstance(msg, str):
            self.line(f"warning: server sent a frame that is not JSON: {msg[:200]!r}", err=True)
        elif self.json_lines:
            self.line(msgspec.json.encode(msg).decode())
        else:
            self._human(msg)

    def _human(self, msg: object) -> None:
        if isinstance(msg, Transcript):
            self._transcript(msg)
        elif isinstance(msg, Ready):
            self.line(
                f"connected: session {msg.session_id}, model {msg.model}, "
                f"{msg.audio.encoding} {msg.audio.sample_rate} Hz, "
                f"credit {msg.credit_bytes} bytes",
                err=True,
            )
        elif isinstance(msg, Warning):
            extra = f" (dropped {msg.dropped_ms} ms)" if msg.dropped_ms else ""
            self.line(f"warning: {msg.code}: {msg.message}{extra}", err=True)
        elif isinstance(msg, Error):
            extra = f" (retry after {msg.retry_after_s} s)" if msg.retry_after_s else ""
            self.line(f"error: {msg.code}: {msg.message}{extra}", err=True)
        elif isinstance(msg, Summary):
            self.line(
                f"summary: audio {_seconds(msg.audio_ms)} s, billed {_seconds(msg.billed_ms)} s, "
                f"{msg.utterances} utterance(s), dropped {msg.dropped_ms} ms, "
                f"cost {msg.cost_micros} micros"
            )
        elif self.verbose:
            self._verbose(msg)

    def _transcript(self, msg: Transcript) -> None:
        if msg.is_final:
            if msg.text.strip():
                self.line(f"[{_seconds(msg.start_ms)}-{_seconds(msg.end_ms)}] {msg.text}")
            else:
                self._clear_interim()
        elif self.tty:
            width = max(20, shutil.get_terminal_size().columns - 1)
            text = f"... {msg.text}"
            if len(text) > width:  # a wrapped line could not be redrawn in place
                text = "... " + text[len(text) - width + 4 :]
            self.out.write(f"\r\x1b[2K{text}")
            self.out.flush()
            self._interim_shown = True
        else:
            self.line(f"(interim) {msg.text}")

    def _verbose(self, msg: object) -> None:
        if isinstance(msg, SpeechStarted):
            text = f"speech started at {_seconds(msg.at_ms)} s"
        elif isinstance(msg, UtteranceEnd):
            text = f"utterance {msg.utterance_id} ended at {_seconds(msg.end_ms)} s"
        elif isinstance(msg, Usage):
            text = (
                f"usage: audio {_seconds(msg.audio_ms)} s, billed {_seconds(msg.billed_ms)} s, "
                f"cost {msg.cost_micros} micros"
                + (
                    f", balance {msg.balance_micros} micros"
                    if msg.balance_micros is not None
                    else ""
                )
            )
        elif isinstance(msg, Credit):
            text = f"credit +{msg.bytes} bytes"
        else:
            text = f"message: {msgspec.json.encode(msg).decode()}"
        self.line(text, err=True)


# --- command line -------------------------------------------------------------------------------


def dev_key(url: str) -> str | None:
    """The local dev key, only for a server on this machine (never sent anywhere else)."""
    host = urlsplit(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = base / DEV_KEY_FILE
        if path.is_file():
            return path.read_text().strip() or None
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `streamgate asr`."""
    parser.add_argument(
        "file",
        type=Path,
        metavar="FILE",
        help="16-bit PCM WAV file (any rate and channel count), or raw audio with "
        "--encoding/--sample-rate",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"ASR endpoint (default {DEFAULT_URL})")
    parser.add_argument(
        "--key", default=None,
        help=f"API key, sent as a Bearer token (default: ${API_KEY_ENV}, or for a local server "
        f"the dev key `streamgate serve` saved in {DEV_KEY_FILE})",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="pace the audio at real time, like a live microphone (default: as fast as credit "
        "allows)",
    )
    parser.add_argument(
        "--encoding",
        choices=ENCODINGS,
        default=None,
        help="WAV input: encoding to send (mulaw/alaw simulate telephony; default pcm_s16le). "
        "Raw input: the file's encoding",
    )
    parser.add_argument(
        "--sample-rate",
        type=int,
        default=None,
        help="WAV input: resample to this rate before sending. Raw input: the file's rate "
        "(required)",
    )
    parser.add_argument("--model", default=None, help="ASR model (server default if omitted)")
    parser.add_argument("--language", default=None, help="language hint, e.g. en-US")
    parser.add_argument(
        "--interim-results",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ask for (or suppress) interim transcripts",
    )
    parser.add_argument(
        "--endpointing-ms", type=int, default=None, help="silence that ends an utterance"
    )
    parser.add_argument(
        "--vad", choices=("off", "low", "medium", "high"), default=None, help="VAD aggressiveness"
    )
    parser.add_argument(
        "--overflow",
        choices=("block", "drop"),
        default=None,
        help="server behaviour if audio arrives faster than it is processed",
    )
    parser.add_argument(
        "--chunk-ms", type=int, default=20, help="audio per binary frame, in ms (default 20)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print each server message as one JSON line"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show speech_started, utterance_end, usage and credit messages (stderr)",
    )


def _session_params(args: argparse.Namespace) -> dict[str, str]:
    params: dict[str, str] = {}
    for name in ("model", "language", "endpointing_ms", "vad", "overflow"):
        value = getattr(args, name, None)
        if value is not None:
            params[name] = str(value)
    if getattr(args, "interim_results", None) is not None:
        params["interim_results"] = "true" if args.interim_results else "false"
    return params


def main(args: argparse.Namespace) -> int:
    """Run `streamgate asr` with parsed arguments; returns the process exit code."""
    prog = "streamgate asr"
    err = sys.stderr
    if args.chunk_ms < 1:
        print(f"{prog}: --chunk-ms must be at least 1", file=err)
        return 2
    try:
        audio = load_audio(args.file, encoding=args.encoding, sample_rate=args.sample_rate)
    except AudioInputError as exc:
        print(f"{prog}: {exc}", file=err)
        return 2

    key = args.key or os.environ.get(API_KEY_ENV) or dev_key(args.url)
    printer = _Printer(sys.stdout, err, json_lines=args.json, verbose=args.verbose)
    try:
        asyncio.run(
            stream_audio(
                args.url,
                audio.data,
                encoding=audio.encoding,
                sample_rate=audio.sample_rate,
                key=key,
                realtime=args.realtime,
                chunk_ms=args.chunk_ms,
                on_event=printer,
                extra_params=_session_params(args),
            )
        )
    except Rejected as exc:
        printer.finish()
        print(f"{prog}: the server rejected the connection: HTTP {exc.status} {exc.code}", file=err)
        if exc.message:
            print(f"  {exc.message}", file=err)
        if exc.retry_after:
            print(f"  retry after {exc.retry_after} s", file=err)
        return 3
    except AbnormalClose as exc:
        printer.finish()
        name = CLOSE_CODE_NAMES.get(exc.code, "unexpected close")
        reason = f": {exc.reason}" if exc.reason else ""
        print(f"{prog}: connection closed with code {exc.code} ({name}){reason}", file=err)
        return 4
    except AsrClientError as exc:
        printer.finish()
        print(f"{prog}: {exc}", file=err)
        return 4
    except (OSError, TimeoutError, WebSocketException) as exc:
        printer.finish()
        print(f"{prog}: cannot connect to {args.url}: {exc}", file=err)
        return 5
    except KeyboardInterrupt:
        printer.finish()
        print(f"{prog}: interrupted", file=err)
        return 130
    printer.finish()
    return 0


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streamgate_client.asr_client",
        description="Stream an audio file to a streamgate ASR endpoint and print the transcripts.",
    )
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_cli())
