"""Speech endpointing on top of webrtcvad, sans-I/O: PCM16 bytes in, speech events out.

Time is audio time (samples consumed), never wall-clock, so results are reproducible and
independent of how the stream was chunked. Sample positions are converted to milliseconds with
floor division (``ms = sample * 1000 // sample_rate``); frames are whole milliseconds at every
webrtcvad rate, so the ``ms`` values are exact except after ``force_end`` flushed a partial frame.

Event stream per utterance: ``SpeechStart``, one or more ``SpeechAudio``, ``SpeechEnd``.
Within an utterance the ``SpeechAudio`` chunks are contiguous: each one starts at the sample
where the previous one ended. Utterances never overlap, and no sample is emitted twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Final, TypeAlias

import _webrtcvad
import webrtcvad

from streamgate_protocol.audio import BytesLike

__all__ = [
    "MODES",
    "SAMPLE_RATES",
    "Endpointer",
    "SpeechAudio",
    "SpeechEnd",
    "SpeechStart",
    "VadEvent",
]

SAMPLE_RATES: Final = frozenset({8000, 16000, 32000, 48000})
# webrtcvad aggressiveness: higher rejects more non-speech (and more quiet speech).
MODES: Final[dict[str, int | None]] = {"off": None, "low": 1, "medium": 2, "high": 3}
FRAME_MS: Final = frozenset({10, 20, 30})


@dataclass(frozen=True, slots=True)
class SpeechStart:
    at_ms: int


@dataclass(slots=True)  # not frozen: one per 20 ms frame of speech, and frozen costs 2x
class SpeechAudio:
    pcm: bytes
    start_ms: int


@dataclass(frozen=True, slots=True)
class SpeechEnd:
    end_ms: int
    forced: bool


VadEvent: TypeAlias = SpeechStart | SpeechAudio | SpeechEnd


class Endpointer:
    """Finds utterances in a PCM16 mono stream and emits their audio with pre-roll.

    Onset needs ``onset_ms`` of voiced frames within a window of that length plus two frames,
    so isolated clicks do not open an utterance; the ``preroll_ms`` before the first voiced
    frame is emitted too, because webrtcvad flags speech a little after the first syllable
    starts. An utterance ends after ``endpointing_ms`` of consecutive unvoiced frames (at most
    that much trailing silence is emitted), when it would exceed ``max_utterance_ms``, or on
    ``force_end()``. Mode ``"off"`` treats all audio as speech.
    """

    __slots__ = (
        "_count",
        "_endpointing_ms",
        "_fb",
        "_frame_ms",
        "_fs",
        "_in_speech",
        "_is_speech",
        "_last_voiced_end",
        "_max_samples",
        "_onset_frames",
        "_pending",
        "_pos",
        "_preroll_frames",
        "_rate",
        "_ring",
        "_ring_max",
        "_silence",
        "_utt_start",
        "_vad",
        "_window",
        "_window_len",
    )

    def __init__(
        self,
        sample_rate: int,
        mode: str,
        *,
        frame_ms: int = 20,
        endpointing_ms: int = 500,
        preroll_ms: int = 300,
        onset_ms: int = 60,
        max_utterance_ms: int = 30000,
    ) -> None:
        if sample_rate not in SAMPLE_RATES:
            raise ValueError(
                f"VAD sample rate must be one of {sorted(SAMPLE_RATES)}, got {sample_rate}"
            )
        if mode not in MODES:
            raise ValueError(f"VAD mode must be one of {list(MODES)}, got {mode!r}")
        if frame_ms not in FRAME_MS:
            raise ValueError(f"VAD frame_ms must be one of {sorted(FRAME_MS)}, got {frame_ms}")
        if endpointing_ms <= 0 or preroll_ms < 0 or onset_ms < 0:
            raise ValueError("endpointing_ms must be > 0; preroll_ms and onset_ms must be >= 0")
        level = MODES[mode]
        self._vad = None if level is None else webrtcvad.Vad(level)
        # webrtcvad's C entry point bound to this instance and rate: Vad.is_speech is a Python
        # wrapper that re-derives and re-checks the frame length on every 20 ms frame.
        self._is_speech: Callable[[BytesLike, int], bool] | None = (
            None if self._vad is None
            else partial(_webrtcvad.process, self._vad._vad, sample_rate)
        )
        self._rate = sample_rate
        self._frame_ms = frame_ms
        self._fs = sample_rate * frame_ms // 1000
        self._fb = 2 * self._fs
        self._endpointing_ms = endpointing_ms
        if level is None:
            # Every frame counts as voiced: the first frame opens the utterance, no pre-roll.
            self._onset_frames = 1
            self._window_len = 1
            self._preroll_frames = 0
        else:
            self._onset_frames = max(1, -(-onset_ms // frame_ms))
            self._window_len = self._onset_frames + 2
            # Floor, so the emitted pre-roll never exceeds preroll_ms.
            self._preroll_frames = preroll_ms // frame_ms
        # Enough history for the pre-roll before the earliest voiced frame of the onset window.
        self._ring_max = (self._preroll_frames + self._window_len) * self._fb
        min_max_ms = (self._preroll_frames + self._window_len + 1) * frame_ms
        if max_utterance_ms < min_max_ms:
            raise ValueError(
                f"max_utterance_ms must be >= {min_max_ms} (pre-roll + onset window + one frame)"
            )
        self._max_samples = max_utterance_ms * sample_rate // 1000
        self._pending = b""
        self._pos = 0  # samples consumed (analysed frames + partial frames flushed by force_end)
        self._in_speech = False
        self._ring = bytearray()  # silence-state audio just before the current position
        # A few frames (onset + 2): a list costs less memory than a deque, and as little time.
        self._window: list[bool] = []
        self._count = 0  # voiced frames in _window
        self._utt_start = 0
        self._silence = 0  # consecutive unvoiced frames in the open utterance
        self._last_voiced_end = 0

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def position_ms(self) -> int:
        """Audio time consumed; a trailing partial frame is not counted until it is analysed."""
        return self._pos * 1000 // self._rate

    @property
    def sample_rate(self) -> int:
        return self._rate

    @property
    def last_voiced_ms(self) -> int:
        """End of the latest voiced frame: an open utterance's end can be no earlier."""
        return self._last_voiced_end * 1000 // self._rate

    def process(self, pcm: BytesLike) -> list[VadEvent]:
        """Feed PCM16 LE mono bytes of any length; returns the events they complete."""
        if len(pcm) == self._fb and not self._pending:
            # One whole frame (a socket read of one 20 ms frame, the usual case): the frame
            # loop below, specialised. Same events and state, for a third of the Python work.
            if self._in_speech:
                # The loop's in-speech branch for one frame (no pending bytes, no prefix).
                fs = self._fs
                pos = self._pos
                pos_end = self._pos = pos + fs
                is_speech = self._is_speech
                emit = ended = forced = False
                end_sample = 0
                if is_speech is None or is_speech(pcm, fs):
                    self._silence = 0
                    self._last_voiced_end = pos_end
                    emit = True
                else:
                    silence = self._silence = self._silence + 1
                    sil_ms = silence * self._frame_ms
                    endp = self._endpointing_ms
                    if sil_ms <= endp:
                        emit = True
                    if sil_ms >= endp:
                        ended = True
                        end_sample = self._last_voiced_end
                if not ended and pos_end - self._utt_start + fs > self._max_samples:
                    # The next frame would not fit: cut here rather than exceed the limit.
                    ended = forced = True
                    end_sample = pos_end
                rate = self._rate
                if not ended:
                    return [SpeechAudio(bytes(pcm), pos * 1000 // rate)]
                self._in_speech = False
                self._ring.clear()
                if emit:
                    return [SpeechAudio(bytes(pcm), pos * 1000 // rate),
                            SpeechEnd(end_sample * 1000 // rate, forced)]
                # An unemitted final silence frame becomes silence history for the next onset.
                self._ring += pcm
                excess = len(self._ring) - self._ring_max
                if excess > 0:
                    del self._ring[:excess]
                return [SpeechEnd(end_sample * 1000 // rate, forced)]
            window = self._window
            base = self._count - window[0] if len(window) == self._window_len else self._count
            if base + 1 < self._onset_frames and self._is_speech is not None:
                # No onset this frame, voiced or not: only the window and the history move.
                voiced = self._is_speech(pcm, self._fs)
                if len(window) == self._window_len:
                    del window[0]
                window.append(voiced)
                self._count = base + voiced
                self._pos += self._fs
                ring = self._ring
                ring += pcm
                excess = len(ring) - self._ring_max
                if excess > 0:
                    del ring[:excess]
                return []
        buf: BytesLike
        if self._pending:
            buf = self._pending + pcm
        else:
            buf = pcm
        fb = self._fb
        usable = len(buf) - len(buf) % fb
        if usable != len(buf):
            self._pending = bytes(buf[usable:])
        elif self._pending:
            self._pending = b""
        if usable == 0:
            return []
        view = memoryview(buf)
        # Hot loop: attributes live in locals and are written back once at the end.
        events: list[VadEvent] = []
        rate = self._rate
        fs = self._fs
        frame_ms = self._frame_ms
        endp = self._endpointing_ms
        is_speech = self._is_speech
        window = self._window
        wlen = self._window_len
        onset_frames = self._onset_frames
        ring = self._ring
        count = self._count
        in_speech = self._in_speech
        silence = self._silence
        last_voiced_end = self._last_voiced_end
        utt_start = self._utt_start
        max_samples = self._max_samples
        pos = self._pos
        silence_from = 0  # offset in buf where this call's silence-state audio starts
        prefix = b""  # pre-roll and onset audio from before the onset frame
        emit_from = emit_to = 0  # slice of buf to emit after prefix
        emit_start = pos  # sample index of the first byte of prefix + buf[emit_from:emit_to]

        for off in range(0, usable, fb):
            end = off + fb
            pos_end = pos + fs
            voiced = True if is_speech is None else is_speech(view[off:end], fs)
            if not in_speech:
                if len(window) == wlen:
                    count -= window.pop(0)
                window.append(voiced)
                count += voiced
                if count >= onset_frames:
                    # Frames from the window's first voiced frame through this one, plus pre-roll.
                    frames = len(window) - window.index(True) + self._preroll_frames
                    have = (len(ring) + end - silence_from) // fb
                    need = min(frames, have) * fb
                    from_buf = end - silence_from
                    if need <= from_buf:
                        prefix = bytes(view[end - need : end])
                    else:
                        prefix = (
                            bytes(ring[len(ring) - (need - from_buf) :]) + view[silence_from:end]
                        )
                    utt_start = emit_start = pos_end - need // 2
                    emit_from = emit_to = end
                    events.append(SpeechStart(utt_start * 1000 // rate))
                    in_speech = True
                    silence = 0
                    last_voiced_end = pos_end
                    window.clear()
                    count = 0
                    ring.clear()
            else:
                ended = forced = False
                end_sample = 0
                if voiced:
                    silence = 0
                    last_voiced_end = pos_end
                    emit_to = end
                else:
                    silence += 1
                    sil_ms = silence * frame_ms
                    if sil_ms <= endp:
                        emit_to = end
                    if sil_ms >= endp:
                        ended = True
                        end_sample = last_voiced_end
                if not ended and pos_end - utt_start + fs > max_samples:
                    # The next frame would not fit: cut here rather than exceed the limit.
                    ended = True
                    forced = True
                    end_sample = pos_end
                if ended:
                    if prefix or emit_to > emit_from:
                        events.append(
                            SpeechAudio(prefix + view[emit_from:emit_to], emit_start * 1000 // rate)
                        )
                    events.append(SpeechEnd(end_sample * 1000 // rate, forced))
                    in_speech = False
                    prefix = b""
                    # An unemitted final silence frame becomes silence history for the next onset.
                    silence_from = emit_to
                    ring.clear()
            pos = pos_end

        if in_speech:
            if prefix or emit_to > emit_from:
                events.append(
                    SpeechAudio(prefix + view[emit_from:emit_to], emit_start * 1000 // rate)
                )
        elif silence_from < usable:
            # bytearray drops its head without moving the rest, so this stays cheap per call.
            ring += view[silence_from:usable]
            excess = len(ring) - self._ring_max
            if excess > 0:
                del ring[:excess]
        self._count = count
        self._in_speech = in_speech
        self._silence = silence
        self._last_voiced_end = last_voiced_end
        self._utt_start = utt_start
        self._pos = pos
        return events

    def force_end(self) -> list[VadEvent]:
        """Close the open utterance now (client finalize/close); [] when none is open."""
        pending = self._pending
        whole = len(pending) - len(pending) % 2
        events: list[VadEvent] = []
        if not self._in_speech:
            if self._vad is not None or not whole:
                return []
            # Mode "off": all audio is speech, so a finalize after less than one frame of audio
            # must still deliver that audio as an utterance.
            self._in_speech = True
            events.append(SpeechStart(self._pos * 1000 // self._rate))
        if whole:
            events.append(SpeechAudio(pending[:whole], self._pos * 1000 // self._rate))
            self._pos += whole // 2
            # An odd byte is the first half of the next sample: keep the byte stream aligned.
            self._pending = pending[whole:]
        events.append(SpeechEnd(self._pos * 1000 // self._rate, True))
        self._in_speech = False
        self._silence = 0
        self._ring.clear()
        self._window.clear()
        self._count = 0
        return events
