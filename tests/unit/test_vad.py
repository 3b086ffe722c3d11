"""Endpointer on real synthetic speech (espeak-ng), tones and silence, in audio time."""

from __future__ import annotations

import functools
import itertools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import webrtcvad

from server.audio.resample import Resampler
from server.audio.vad import Endpointer, SpeechAudio, SpeechEnd, SpeechStart, VadEvent
from streamgate_protocol.audio import StreamDecoder

Int16Array = npt.NDArray[np.int16]

SENTENCE_A = "The quick brown fox jumps over the lazy dog."
SENTENCE_B = "Hello world, this is a second sentence."
# webrtcvad keeps flagging frames as voiced for a while after speech stops (its own overhang),
# so detected ends trail the last audible sample by up to this much.
VAD_HANGOVER_MS = 200


@functools.cache
def _espeak(text: str, rate: int) -> Int16Array:
    """espeak-ng speech, trimmed to its audible extent, resampled to ``rate``."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail(
            "espeak-ng is not installed; the VAD tests need real speech. "
            "Run scripts/setup.sh (it installs the espeak-ng Debian package)."
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True)
        dec = StreamDecoder("wav", 16000)
        x = dec.decode(path.read_bytes())
    r = Resampler(dec.sample_rate, rate)
    y = np.concatenate([r.process(x), r.flush()])
    loud = np.nonzero(np.abs(y) > 200)[0]
    out = y[loud[0] : loud[-1] + 1]
    assert len(out) > rate, "espeak-ng produced suspiciously little audio"
    return out


def _silence(rate: int, ms: int) -> Int16Array:
    return np.zeros(rate * ms // 1000, np.int16)


def _tone(rate: int, ms: int, freq: float = 440.0) -> Int16Array:
    t = np.arange(rate * ms // 1000) / rate
    return (np.sin(2 * np.pi * freq * t) * 8000).astype(np.int16)


def _ms(rate: int, samples: int) -> int:
    return samples * 1000 // rate


def _feed(ep: Endpointer, pcm: bytes, sizes: list[int] | None = None) -> list[VadEvent]:
    if sizes is None:
        return ep.process(pcm)
    events: list[VadEvent] = []
    i = 0
    for n in sizes:
        events += ep.process(pcm[i : i + n])
        i += n
    events += ep.process(pcm[i:])
    return events


def _frames(ep: Endpointer, pcm: bytes, frame_bytes: int) -> tuple[list[VadEvent], list[int]]:
    """Feed frame by frame; also return position_ms at which each SpeechEnd came out."""
    events: list[VadEvent] = []
    end_positions: list[int] = []
    for i in range(0, len(pcm), frame_bytes):
        new = ep.process(pcm[i : i + frame_bytes])
        end_positions += [ep.position_ms for e in new if isinstance(e, SpeechEnd)]
        events += new
    return events, end_positions


@dataclass
class Utterance:
    at_ms: int
    pcm: bytes
    end_ms: int | None
    forced: bool | None
    chunks: int

    def audio_end_ms(self, rate: int) -> int:
        return self.at_ms + _ms(rate, len(self.pcm) // 2)


def _utterances(events: list[VadEvent], rate: int, *, exact: bool = True) -> list[Utterance]:
    """Group events by utterance, asserting the ordering and contiguity invariants."""
    utts: list[Utterance] = []
    cur: Utterance | None = None
    prev_end = 0
    for e in events:
        if isinstance(e, SpeechStart):
            assert cur is None, f"SpeechStart inside an open utterance: {e}"
            assert e.at_ms >= prev_end, "utterances overlap"
            cur = Utterance(e.at_ms, b"", None, None, 0)
        elif isinstance(e, SpeechAudio):
            assert cur is not None, "SpeechAudio outside an utterance"
            assert e.pcm and len(e.pcm) % 2 == 0
            # Chunks abut in samples; ms are floored, so compare in samples when exact.
            expected = cur.at_ms * rate + len(cur.pcm) // 2 * 1000
            if exact:
                assert e.start_ms * rate == expected, "SpeechAudio not contiguous"
            else:
                assert abs(e.start_ms * rate - expected) < rate, "SpeechAudio not contiguous"
            cur.pcm += e.pcm
            cur.chunks += 1
        else:
            assert cur is not None, "SpeechEnd outside an utterance"
            assert cur.pcm, "empty utterance"
            cur.end_ms, cur.forced = e.end_ms, e.forced
            assert e.end_ms <= cur.audio_end_ms(rate)
            prev_end = cur.audio_end_ms(rate)
            utts.append(cur)
            cur = None
    if cur is not None:
        utts.append(cur)
    return utts


def _normalized(events: list[VadEvent]) -> list[object]:
    """Events with each utterance's audio merged, so differently chunked runs compare equal."""
    out: list[object] = []
    audio: bytearray | None = None
    for e in events:
        if isinstance(e, SpeechAudio):
            if audio is None:
                audio = bytearray()
                out.append(("audio", e.start_ms, audio))
            audio += e.pcm
        else:
            audio = None
            out.append(e)
    return out


def _first_voiced_ms(pcm: Int16Array, rate: int, mode: int, frame_ms: int) -> int:
    vad = webrtcvad.Vad(mode)
    n = rate * frame_ms // 1000
    for i in range(0, len(pcm) - n + 1, n):
        if vad.is_speech(pcm[i : i + n].tobytes(), rate):
            return i * 1000 // rate
    raise AssertionError("no voiced frame")


@pytest.mark.parametrize(
    ("rate", "frame_ms", "mode"),
    [(16000, 20, "medium"), (8000, 30, "low"), (48000, 10, "high"), (32000, 20, "medium")],
)
def test_one_sentence_one_utterance(rate: int, frame_ms: int, mode: str) -> None:
    speech = _espeak(SENTENCE_A, rate)
    lead = 1000
    sig = np.concatenate([_silence(rate, lead), speech, _silence(rate, 1500)])
    ep = Endpointer(rate, mode, frame_ms=frame_ms)
    events, end_positions = _frames(ep, sig.tobytes(), rate * frame_ms // 1000 * 2)
    [utt] = _utterances(events, rate)
    assert utt.end_ms is not None and utt.forced is False
    speech_end = lead + _ms(rate, len(speech))
    assert lead - 300 - 5 * frame_ms <= utt.at_ms <= lead  # starts before the speech
    assert speech_end - frame_ms <= utt.end_ms <= speech_end + VAD_HANGOVER_MS
    # Detected once endpointing_ms of silence followed the last voiced frame.
    assert utt.end_ms + 500 <= end_positions[0] <= utt.end_ms + 500 + frame_ms
    assert end_positions[0] <= speech_end + 500 + VAD_HANGOVER_MS + frame_ms
    # The audio is the input itself, covering all of the speech, with <= 500 ms of tail.
    assert 0 < utt.audio_end_ms(rate) - utt.end_ms <= 500
    start = utt.at_ms * rate // 1000
    assert utt.pcm == sig[start : start + len(utt.pcm) // 2].tobytes()
    assert utt.audio_end_ms(rate) >= speech_end
    frame = rate * frame_ms // 1000
    assert not ep.in_speech and ep.position_ms == _ms(rate, len(sig) - len(sig) % frame)


def test_two_sentences_two_utterances() -> None:
    rate = 16000
    a, b = _espeak(SENTENCE_A, rate), _espeak(SENTENCE_B, rate)
    sig = np.concatenate([_silence(rate, 500), a, _silence(rate, 1500), b, _silence(rate, 800)])
    utts = _utterances(_feed(Endpointer(rate, "medium"), sig.tobytes()), rate)
    assert len(utts) == 2
    a_end = 500 + _ms(rate, len(a))
    b_start = a_end + 1500
    assert utts[0].at_ms <= 500 and a_end - 20 <= (utts[0].end_ms or 0) < b_start
    assert a_end < utts[1].at_ms <= b_start
    assert (utts[1].end_ms or 0) >= b_start + _ms(rate, len(b)) - 20
    assert all(u.forced is False for u in utts)


@pytest.mark.parametrize("mode", ["low", "medium", "high"])
def test_silence_only_gives_no_events(mode: str) -> None:
    ep = Endpointer(16000, mode)
    pcm = _silence(16000, 3000).tobytes()
    assert _feed(ep, pcm, [640] * 149) == []
    assert ep.force_end() == []
    assert ep.position_ms == 3000 and not ep.in_speech


@pytest.mark.parametrize("mode", ["low", "medium", "high"])
def test_tone_bursts(mode: str) -> None:
    # webrtcvad flags steady tones as speech: each 300 ms burst becomes one utterance.
    rate = 16000
    parts = [_silence(rate, 500)]
    for _ in range(3):
        parts += [_tone(rate, 300), _silence(rate, 1000)]
    utts = _utterances(_feed(Endpointer(rate, mode), np.concatenate(parts).tobytes()), rate)
    assert len(utts) == 3
    for k, u in enumerate(utts):
        burst = 500 + k * 1300
        assert u.at_ms <= burst and burst + 300 <= (u.end_ms or 0) <= burst + 300 + VAD_HANGOVER_MS


def test_short_click_needs_longer_onset_to_be_ignored() -> None:
    # webrtcvad's overhang stretches a 20 ms click to ~100 ms of voiced frames, so the default
    # 60 ms onset opens an utterance for it; an onset above the overhang rejects it.
    rate = 16000
    sig = np.concatenate([_silence(rate, 1000), _tone(rate, 20), _silence(rate, 1000)]).tobytes()
    assert len(_utterances(Endpointer(rate, "medium").process(sig), rate)) == 1
    assert Endpointer(rate, "medium", onset_ms=160).process(sig) == []


@pytest.mark.parametrize("preroll_ms", [300, 100, 0])
def test_preroll_precedes_first_voiced_frame(preroll_ms: int) -> None:
    rate = 16000
    speech = _espeak(SENTENCE_A, rate)
    sig = np.concatenate([_silence(rate, 1000), speech, _silence(rate, 700)])
    first_voiced = _first_voiced_ms(sig, rate, 2, 20)
    events = Endpointer(rate, "medium", preroll_ms=preroll_ms).process(sig.tobytes())
    [utt] = _utterances(events, rate)
    assert utt.at_ms == first_voiced - preroll_ms
    assert isinstance(events[1], SpeechAudio) and events[1].start_ms == utt.at_ms


def test_preroll_clamped_at_stream_start() -> None:
    rate = 16000
    sig = np.concatenate([_silence(rate, 100), _espeak(SENTENCE_A, rate), _silence(rate, 700)])
    events = Endpointer(rate, "medium").process(sig.tobytes())
    assert events[0] == SpeechStart(0)
    assert isinstance(events[1], SpeechAudio) and events[1].start_ms == 0


def test_force_end_mid_utterance_flushes_partial_frame() -> None:
    rate = 16000
    speech = _espeak(SENTENCE_A, rate)
    sig = np.concatenate([_silence(rate, 500), speech, _silence(rate, 1000)]).tobytes()
    ep = Endpointer(rate, "medium")
    cut = 2 * rate + 101  # 1 s in, plus 50 samples and half a sample
    events = ep.process(sig[:cut])
    assert ep.in_speech and ep.position_ms == 1000
    ended = ep.force_end()
    assert ended[0] == SpeechAudio(sig[cut - 101 : cut - 1], 1000)
    assert ended[1] == SpeechEnd(ep.position_ms, True)
    assert ep.position_ms == 1003 and not ep.in_speech  # 1000 ms + 50 samples, floored
    assert ep.force_end() == []
    # The odd byte was kept, so later audio stays sample-aligned.
    events += ended + ep.process(sig[cut:])
    utts = _utterances(events, rate, exact=False)
    assert len(utts) == 2 and utts[0].forced is True and utts[1].forced is False
    # Frames now start at byte 32100 + k * 640 (sample 16050, i.e. 1003.125 ms, floored).
    offset = sig.find(utts[1].pcm)
    assert offset >= cut - 1 and (offset - (cut - 1)) % 640 == 0
    assert utts[1].at_ms == offset // 2 * 1000 // rate


def test_force_end_when_idle_keeps_pending_audio() -> None:
    ep = Endpointer(16000, "medium")
    assert ep.process(bytes(101)) == []
    assert ep.force_end() == []
    assert ep.position_ms == 0
    ep.process(bytes(539))
    assert ep.position_ms == 20  # the 101 pending bytes completed a frame


def test_mode_off() -> None:
    rate = 16000
    ep = Endpointer(rate, "off")
    pcm = _tone(rate, 100).tobytes()
    assert ep.process(pcm) == [SpeechStart(0), SpeechAudio(pcm, 0)]
    assert ep.process(pcm[:1000]) == [SpeechAudio(pcm[:640], 100)]  # 360 bytes wait
    assert ep.force_end() == [SpeechAudio(pcm[640:1000], 120), SpeechEnd(131, True)]
    assert ep.force_end() == []
    assert ep.process(pcm[:640]) == [SpeechStart(131), SpeechAudio(pcm[:640], 131)]
    # Less than a frame before a finalize still becomes an utterance.
    ep = Endpointer(rate, "off")
    assert ep.process(bytes(100)) == []
    assert ep.force_end() == [SpeechStart(0), SpeechAudio(bytes(100), 0), SpeechEnd(3, True)]


def test_mode_off_max_utterance() -> None:
    rate = 16000
    ep = Endpointer(rate, "off", max_utterance_ms=1000)
    pcm = _tone(rate, 2500).tobytes()
    utts = _utterances(_feed(ep, pcm, [1234] * 30), rate)
    assert [(u.at_ms, u.end_ms, u.forced) for u in utts] == [
        (0, 1000, True),
        (1000, 2000, True),
        (2000, None, None),
    ]
    assert b"".join(u.pcm for u in utts) == pcm


def test_max_utterance_on_continuous_speech() -> None:
    rate = 16000
    speech = _espeak(SENTENCE_A, rate)
    sig = np.concatenate([_silence(rate, 500), speech, speech, speech, _silence(rate, 1000)])
    events = _feed(Endpointer(rate, "medium", max_utterance_ms=2000), sig.tobytes(), [960] * 200)
    utts = _utterances(events, rate)
    assert len(utts) >= 3
    for prev, nxt in itertools.pairwise(utts):
        assert prev.forced is True and prev.end_ms == prev.audio_end_ms(rate)
        assert len(prev.pcm) // 2 <= 2 * rate
        # Speech continues, so the next utterance picks up exactly where the cut was.
        assert nxt.at_ms == prev.audio_end_ms(rate)
    audio = b"".join(u.pcm for u in utts)
    start = utts[0].at_ms * rate // 1000
    assert audio == sig[start : start + len(audio) // 2].tobytes()


@pytest.mark.parametrize("mode", ["medium", "off"])
def test_odd_size_pieces_match_one_shot(mode: str) -> None:
    rate = 16000
    a, b = _espeak(SENTENCE_A, rate), _espeak(SENTENCE_B, rate)
    sig = np.concatenate([_silence(rate, 400), a, _silence(rate, 1500), b, _silence(rate, 900)])
    pcm = sig.tobytes()
    kwargs = {"max_utterance_ms": 1500} if mode == "off" else {}
    one_shot = Endpointer(rate, mode, **kwargs).process(pcm)
    _utterances(one_shot, rate)
    rng = np.random.default_rng(7)
    for sizes in ([1, 3, 5, 7] * 50, [int(n) | 1 for n in rng.integers(1, 3000, 400)]):
        events = _feed(Endpointer(rate, mode, **kwargs), pcm, sizes)
        _utterances(events, rate)
        assert _normalized(events) == _normalized(one_shot)


def test_accepts_bytearray_and_memoryview() -> None:
    rate = 16000
    sig = np.concatenate([_silence(rate, 400), _espeak(SENTENCE_A, rate), _silence(rate, 700)])
    pcm = sig.tobytes()
    ep = Endpointer(rate, "medium")
    buf = bytearray(pcm[12345:40001])
    events = ep.process(memoryview(pcm)[:12345]) + ep.process(buf)
    buf[:] = bytes(len(buf))  # a reused receive buffer must not corrupt emitted audio
    events += ep.process(memoryview(pcm)[40001:])
    assert _normalized(events) == _normalized(Endpointer(rate, "medium").process(pcm))


def test_one_audio_event_per_call() -> None:
    rate = 16000
    sig = np.concatenate([_silence(rate, 400), _espeak(SENTENCE_A, rate)]).tobytes()
    ep = Endpointer(rate, "medium")
    assert [type(e) for e in ep.process(sig[: 2 * 16 * 1000])] == [SpeechStart, SpeechAudio]
    assert [type(e) for e in ep.process(sig[32000:38400])] == [SpeechAudio]  # 10 frames


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sample_rate": 22050, "mode": "medium"}, "sample rate"),
        ({"sample_rate": 16000, "mode": "aggressive"}, "mode"),
        ({"sample_rate": 16000, "mode": "low", "frame_ms": 25}, "frame_ms"),
        ({"sample_rate": 16000, "mode": "low", "endpointing_ms": 0}, "endpointing_ms"),
        ({"sample_rate": 16000, "mode": "low", "max_utterance_ms": 200}, "max_utterance_ms"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Endpointer(**kwargs)  # type: ignore[arg-type]
