"""Pocketsphinx worker process: one decoder, driven over stdin/stdout.

pocketsphinx 5.1.1 holds the GIL for the whole of process_raw/end_utt, so decoding inside the
gateway would stall its event loop (end_utt alone: ~45 ms per second of speech). The engine
(server.models.pocketsphinx_engine) therefore runs each decoder in its own process:

    python -m server.models.sphinx_worker

Protocol: frames of a 4-byte big-endian length followed by a msgpack-encoded tagged Struct.
Strictly request/reply, one request in flight. On start-up the worker builds its decoder and
sends Ok (ready) or Err (then exits 1). Then:

    Start              -> Ok                 begin an utterance (ends a dangling one first)
    Feed(pcm, want)    -> Hyp(text | None)   16 kHz PCM16 mono; text only if want_hyp
    Finish             -> Final(text, words) end the utterance; words as (word, start_ms,
                                             end_ms, confidence) with fillers removed
    Abort              -> Ok                 drop the utterance, if any
    anything failing   -> Err(message)       the worker is left idle (no utterance)

EOF on stdin makes the worker exit 0. stdout carries only frames: fd 1 is redirected to stderr
at start-up, so stray output from Python or the C library cannot corrupt the channel. Errors
go to stderr (inherited from the gateway).

The pure helpers (filler filtering, alternative-pronunciation suffixes, frames to ms) live
here too; this module imports pocketsphinx only when run as the worker, so the gateway can
import the protocol without loading the decoder library.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import struct
import sys
from collections.abc import Iterable
from typing import IO, Any

import msgspec

log = logging.getLogger("server.models.sphinx_worker")

SAMPLE_RATE = 16000
HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024  # far above any sane feed; a bigger length is garbage

_ALT_PRONUNCIATION = re.compile(r"\(\d+\)$")

RawSegment = tuple[str, int, int, float]  # (word, start_frame, end_frame inclusive, prob 0..1)
Word = tuple[str, int, int, float]  # (word, start_ms, end_ms, confidence 0..1)


# --- protocol -------------------------------------------------------------------------------


class Start(msgspec.Struct, tag=True, array_like=True):
    # The cepstral mean to start from: the session's last utterance's, or "" (the model's).
    cmn: str = ""


class Feed(msgspec.Struct, tag=True, array_like=True):
    pcm: bytes
    want_hyp: bool = False


class Finish(msgspec.Struct, tag=True, array_like=True):
    pass


class Abort(msgspec.Struct, tag=True, array_like=True):
    pass


class Hyp(msgspec.Struct, tag=True, array_like=True):
    text: str | None


class Final(msgspec.Struct, tag=True, array_like=True):
    text: str
    words: list[Word]
    cmn: str = ""  # the cepstral mean the utterance ended with: the session's next Start


class Ok(msgspec.Struct, tag=True, array_like=True):
    pass


class Err(msgspec.Struct, tag=True, array_like=True):
    message: str


Request = Start | Feed | Finish | Abort
Reply = Hyp | Final | Ok | Err

_encoder = msgspec.msgpack.Encoder()
request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
reply_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)


def encode_frame(msg: Request | Reply) -> bytes:
    payload = _encoder.encode(msg)
    return HEADER.pack(len(payload)) + payload


class ProtocolError(Exception):
    """The byte stream is not a valid frame sequence."""


def frame_length(header: bytes) -> int:
    (n,) = HEADER.unpack(header)
    if n > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME_BYTES}")
    return int(n)


# --- pure decoding helpers ------------------------------------------------------------------


def is_filler(word: str) -> bool:
    # <s>, </s>, <sil>, [NOISE], [SPEECH], and ++GARBAGE++ style fillers of older models.
    return (
        (word.startswith("<") and word.endswith(">"))
        or (word.startswith("[") and word.endswith("]"))
        or (word.startswith("+") and word.endswith("+"))
    )


def words_from_segments(segments: Iterable[RawSegment], frate: int) -> list[Word]:
    """Decoder segments to (word, start_ms, end_ms, confidence), fillers dropped.

    "word(2)" (alternative pronunciation) becomes "word"; end_frame is inclusive. Segment.prob
    is already linear (the 5.x binding applies logmath_exp to ps_seg_prob), only clamped here.
    """
    return [
        (
            _ALT_PRONUNCIATION.sub("", word),
            start * 1000 // frate,
            (end + 1) * 1000 // frate,
            min(1.0, max(0.0, float(prob))),
        )
        for word, start, end, prob in segments
        if not is_filler(word)
    ]


def final_from_segments(segments: Iterable[RawSegment], frate: int) -> Final:
    words = words_from_segments(segments, frate)
    return Final(text=" ".join(w[0] for w in words), words=words)


# --- the worker -----------------------------------------------------------------------------


class DecoderSession:
    """Applies requests to one decoder; always leaves it idle after an error."""

    def __init__(self, decoder: Any) -> None:
        self._dec = decoder
        self._in_utt = False
        self._frate = int(decoder.config["frate"])
        # Live cepstral mean normalisation adapts to the audio it hears and carries that into
        # the next utterance: in a pooled worker, into another session's (another tenant's),
        # so the same audio read differently by worker and by history. Every utterance starts
        # from fresh feature state (reinit_feat, ~0.1 ms: set_cmn alone keeps the live
        # update's history) and the mean its own session's last one ended with (Start.cmn).

    def handle(self, req: Request) -> Reply:
        try:
            return self._handle(req)
        except Exception as exc:
            log.exception("sphinx worker: %s failed", type(req).__name__)
            self._reset()
            return Err(f"{type(req).__name__} failed: {exc!r}")

    def _handle(self, req: Request) -> Reply:
        dec = self._dec
        if isinstance(req, Feed):
            if not self._in_utt:
                return Err("Feed outside an utterance (no Start)")
            dec.process_raw(req.pcm, False, False)
            if not req.want_hyp:
                return Hyp(text=None)
            hyp = dec.hyp()
            return Hyp(text=hyp.hypstr if hyp is not None else "")
        if isinstance(req, Start):
            self._reset()
            dec.reinit_feat()
            if req.cmn:
                dec.set_cmn(req.cmn)
            dec.start_utt()
            self._in_utt = True
            return Ok()
        if isinstance(req, Finish):
            if not self._in_utt:
                return Err("Finish outside an utterance (no Start)")
            self._in_utt = False
            dec.end_utt()
            segs = [(s.word, s.start_frame, s.end_frame, s.prob) for s in dec.seg() or ()]
            final = final_from_segments(segs, self._frate)
            return msgspec.structs.replace(final, cmn=str(dec.get_cmn()))
        # Abort
        self._reset()
        return Ok()

    def _reset(self) -> None:
        if self._in_utt:
            self._in_utt = False
            self._dec.end_utt()


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    data = stream.read(n)
    if not data:
        return None
    while len(data) < n:  # BufferedReader.read(n) only comes back short at EOF
        more = stream.read(n - len(data))
        if not more:
            raise ProtocolError(f"EOF inside a frame ({len(data)} of {n} bytes)")
        data += more
    return data


def read_frame(stream: IO[bytes]) -> bytes | None:
    """One frame's payload, or None on a clean EOF between frames."""
    header = _read_exactly(stream, HEADER.size)
    if header is None:
        return None
    n = frame_length(header)
    if n == 0:
        return b""
    payload = _read_exactly(stream, n)
    if payload is None:
        raise ProtocolError(f"EOF inside a frame (0 of {n} bytes)")
    return payload


def _new_decoder() -> Any:
    import pocketsphinx

    # The default config points at the model inside the wheel (pocketsphinx.get_model_path());
    # FATAL keeps its very chatty INFO logging off stderr.
    return pocketsphinx.Decoder(loglevel="FATAL")


def serve(decoder_factory: Any = _new_decoder) -> int:
    # Shutdown is EOF on stdin; Ctrl-C in the gateway's terminal reaches the whole process
    # group, and the gateway decides when its workers go.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel_in = sys.stdin.buffer
    out_fd = os.dup(1)
    os.dup2(2, 1)  # fd 1 (C stdio, print) now goes to stderr; only frames reach the gateway
    sys.stdout = sys.stderr

    def send(reply: Reply) -> None:
        view = memoryview(encode_frame(reply))
        while view:  # unbuffered: nothing is left to flush (or fail) at exit
            view = view[os.write(out_fd, view) :]

    try:
        try:
            session = DecoderSession(decoder_factory())
        except Exception as exc:
            log.exception("sphinx worker: decoder initialisation failed")
            send(Err(f"decoder initialisation failed: {exc!r}"))
            return 1
        send(Ok())
        while True:
            payload = read_frame(channel_in)
            if payload is None:
                return 0
            try:
                req = request_decoder.decode(payload)
            except msgspec.DecodeError as exc:
                # Framing is intact (the length was read), so the channel is still in sync.
                send(Err(f"bad request: {exc}"))
                continue
            send(session.handle(req))
    except BrokenPipeError:
        return 0  # the gateway went away: nobody to answer
    except ProtocolError as exc:
        log.error("sphinx worker: %s", exc)
        return 2


def main() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format=f"%(asctime)s sphinx_worker[{os.getpid()}] %(levelname)s %(message)s",
    )
    sys.exit(serve())


if __name__ == "__main__":
    main()
