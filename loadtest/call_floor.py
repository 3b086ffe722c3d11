"""The floor under a phone call's CPU: `python -m loadtest.call_floor`.

Issue 15 asks for 1,000 Twilio calls per core with server CPU <= 90 %: 900 us of CPU per
call-second, 18 us per 20 ms `media` frame for everything the server does. This measures what
the libraries alone cost per frame, on the same audio the bench's calls send, with nothing of
ours between the calls but a loop: msgspec's JSON decode of the `media` message (a tagged
Struct, as server/telephony/providers does), base64, G.711 mu-law -> PCM16 (the numpy table
the server uses), webrtcvad on the 20 ms frame, then soxr's 8 -> 16 kHz stream (MQ, as a
call's caller audio is resampled) fed 100 ms at a time. Each stage is cumulative. It is a lower
bound on the inbound side alone: no socket read, no WebSocket framing, no agent reply, TTS,
mark, billing or metrics; the bench adds raw-echo's cost per frame from the same run (a read,
websockets' parser and a small write per frame) to say what a server of this design could
reach if everything of ours cost nothing.

    python -m loadtest.call_floor [--frames 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import base64
import time
from dataclasses import dataclass

import msgspec
import numpy
import soxr
import webrtcvad

from loadtest.loadgen import FRAME_MS, audio_frames
from streamgate_protocol.audio import Int16Array, ulaw_to_pcm16

CALL_SECOND_FRAMES = 1000 // FRAME_MS
RESAMPLE_FRAMES = 5  # soxr is fed 100 ms at a time: per 20 ms frame its call costs ~3x more
STAGES = ("JSON decode (msgspec)", "+ base64", "+ mu-law -> PCM16", "+ webrtcvad",
          f"+ soxr 8 -> 16 kHz (MQ, {RESAMPLE_FRAMES * FRAME_MS} ms)")


class _Media(msgspec.Struct):
    payload: str


class _MediaMessage(msgspec.Struct, tag_field="event", tag="media"):
    sequenceNumber: str
    media: _Media
    streamSid: str


@dataclass(frozen=True)
class FloorStage:
    name: str
    us_per_frame: float  # cumulative: this stage and every one before it

    @property
    def us_per_call_second(self) -> float:
        return self.us_per_frame * CALL_SECOND_FRAMES

    def calls_at(self, cpu_pct: float) -> float:
        return cpu_pct / 100 * 1e6 / self.us_per_call_second


def media_messages() -> list[bytes]:
    """The bench's speech loop as Twilio sends it (loadtest.twilio_calls' message shape)."""
    stream = "MZ" + "0" * 32
    return [msgspec.json.encode({
        "event": "media", "sequenceNumber": str(i + 3), "streamSid": stream,
        "media": {"track": "inbound", "chunk": str(i + 1), "timestamp": str(i * FRAME_MS),
                  "payload": base64.b64encode(frame).decode()}})
        for i, frame in enumerate(audio_frames("speech"))]


def _run(stage: int, messages: list[bytes], frames: int) -> float:
    decode = msgspec.json.Decoder(_MediaMessage).decode
    b64decode = base64.b64decode
    is_speech = webrtcvad.Vad(2).is_speech
    resample = soxr.ResampleStream(8000, 16000, 1, dtype="int16", quality="MQ").resample_chunk
    concatenate = numpy.concatenate
    n = len(messages)
    held: list[Int16Array] = []
    t0 = time.process_time()
    for i in range(frames):
        msg = decode(messages[i % n])
        if stage == 0:
            continue
        ulaw = b64decode(msg.media.payload)
        if stage == 1:
            continue
        pcm = ulaw_to_pcm16(ulaw)
        if stage == 2:
            continue
        is_speech(pcm.tobytes(), 8000)
        if stage == 3:
            continue
        held.append(pcm)
        if len(held) == RESAMPLE_FRAMES:
            resample(concatenate(held))
            held.clear()
    return (time.process_time() - t0) / frames * 1e6


def measure(frames: int = 200_000, repeat: int = 3) -> list[FloorStage]:
    """Each stage's best of `repeat` runs (CPU time of this process)."""
    messages = media_messages()
    return [FloorStage(name, min(_run(i, messages, frames) for _ in range(repeat)))
            for i, name in enumerate(STAGES)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    for s in measure(args.frames, args.repeat):
        print(f"{s.name:26s} {s.us_per_frame:6.2f} us per frame, {s.us_per_call_second:6.0f} us "
              f"per call-second: {s.calls_at(90):6,.0f} calls in 90 % of a core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
