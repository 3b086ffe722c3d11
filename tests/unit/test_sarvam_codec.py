"""The Sarvam dialect's codecs (server/compat/sarvam/): Sarvam messages in -> our commands,
our session's events -> Sarvam messages out, byte for byte where Sarvam's SDK parses them; and
the TTS socket's credit, granted only for audio the socket has taken."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Coroutine
from typing import Any, cast

import numpy as np
import soundfile

from server.compat.sarvam.endpoint import SarvamTtsSession
from server.compat.sarvam.stt_codec import AudioIn, FlushIn, Ignored, Refused, SttCodec
from server.compat.sarvam.tts_codec import BadConfig, TtsCodec
from server.compat.sarvam.tts_codec import Refused as TtsRefused
from server.flow_control.sarvam import MAX_LATENCY_MARKS, MAX_TTS_TEXT_CHARS
from server.sessions.tts import Flush, GrantCredit, Reconfigure, SubmitText
from server.sessions.upgrade import SessionSocket
from streamgate_protocol import messages as m
from streamgate_protocol.audio import wav_header


def audio_msg(data: bytes, rate: int | None = 16000) -> bytes:
    audio: dict[str, Any] = {"data": base64.b64encode(data).decode(), "encoding": "audio/wav"}
    if rate is not None:
        audio["sample_rate"] = rate
    return json.dumps({"audio": audio}).encode()


def stt(**kw: Any) -> SttCodec:
    return SttCodec(**{"connection_rate": None, "language": "en-IN", "vad_signals": True, **kw})


# --- speech to text: in ---------------------------------------------------------------------------


def test_a_wav_message_gives_its_samples_at_its_header_rate() -> None:
    pcm = b"\x01\x00\x02\x00" * 100
    got = stt().decode(audio_msg(wav_header(22050, 1, 200) + pcm), 0.0)
    assert got == AudioIn(pcm, 22050)


def test_raw_pcm_takes_the_connection_rate_before_the_messages() -> None:
    assert stt(connection_rate=8000).decode(audio_msg(b"\0\0" * 80), 0.0) == \
        AudioIn(b"\0\0" * 80, 8000)
    assert stt().decode(audio_msg(b"\0\0" * 80, rate=24000), 0.0) == AudioIn(b"\0\0" * 80, 24000)
    assert stt().decode(audio_msg(b"\0\0", rate=None), 0.0) == AudioIn(b"\0\0", 16000)
    as_text = b'{"audio": {"data": "AAA=", "sample_rate": "8000"}}'
    assert stt().decode(as_text, 0.0) == AudioIn(b"\0\0", 8000)


def test_the_first_audio_fixes_the_rate() -> None:
    codec = stt()
    assert isinstance(codec.decode(audio_msg(wav_header(16000, 1, 1) + b"\0\0"), 0.0), AudioIn)
    refused = codec.decode(audio_msg(wav_header(8000, 1, 1) + b"\0\0"), 0.0)
    assert isinstance(refused, Refused) and refused.code == "bad_audio"


def test_bad_client_messages_are_refused() -> None:
    codec = stt()
    for raw, code in [
        (b'{"audio": {"data": "***"}}', "bad_audio"),
        (b'{"audio": {"data": ""}}', "bad_audio"),
        (audio_msg(b"\0\0\0"), "bad_audio"),  # odd byte count
        (audio_msg(wav_header(16000, 2, 1) + b"\0\0\0\0"), "bad_audio"),  # stereo
        (audio_msg(b"RIFF\0\0\0\0WAVEjunk"), "bad_audio"),
        (b'{"type": "dance"}', "bad_message"),
        (b"not json", "bad_message"),
        (b'{"audio": 5}', "bad_message"),
        (b"[" * 100 + b"]" * 100, "bad_message"),
    ]:
        got = codec.decode(raw, 0.0)
        assert isinstance(got, Refused) and got.code == code, (raw, got)
    assert codec.rate is None  # nothing refused fixed the rate


def test_flush_and_config() -> None:
    assert stt().decode(b'{"type": "flush"}', 0.0) == FlushIn()
    assert stt().decode(b'{"type": "config", "prompt": "names"}', 0.0) == Ignored()


def test_arrival_times_kept_are_bounded() -> None:
    codec = stt()
    for i in range(5 * MAX_LATENCY_MARKS):
        codec.decode(audio_msg(b"\0\0" * 1600), float(i))  # 100 ms each
    assert len(codec._marks) == MAX_LATENCY_MARKS


# --- speech to text: out --------------------------------------------------------------------------


def final(text: str, end_ms: int = 2500) -> m.Transcript:
    return m.Transcript(utterance_id=1, is_final=True, text=text, start_ms=500, end_ms=end_ms)


def test_a_final_is_a_data_message_after_its_end_of_speech() -> None:
    codec = stt()
    codec.encode(m.Ready(session_id="s1", resume_token="", audio=m.AudioFormat(
        encoding="pcm_s16le", sample_rate=16000), credit_bytes=1, limits=m.Limits(
        max_frame_bytes=1, idle_timeout_s=1, usage_interval_s=1, max_utterance_ms=1),
        model="x"), 0.0, 0.0)
    codec.decode(audio_msg(b"\0\0" * 16000 * 2), 10.0)  # 2 s of audio arrived at t=10
    codec.decode(audio_msg(b"\0\0" * 16000), 11.0)  # up to 3 s at t=11
    started = codec.encode(m.SpeechStarted(at_ms=500), 10.0, 1700000000.0)
    assert [json.loads(x) for x in started] == [{"type": "events", "data": {
        "event_type": "vad", "signal_type": "START_SPEECH", "occured_at": 1700000000.0}}]
    assert codec.speaking
    out = [json.loads(x) for x in codec.encode(final("hello"), 11.25, 1700000001.0)]
    assert out == [
        {"type": "events", "data": {"event_type": "vad", "signal_type": "END_SPEECH",
                                    "occured_at": 1700000001.0}},
        {"type": "data", "data": {
            "request_id": "s1", "transcript": "hello",
            "metrics": {"audio_duration": 2.0, "processing_latency": 0.25},
            "language_code": "en-IN", "timestamps": None, "diarized_transcript": None,
            "language_probability": None}},
    ]
    assert not codec.speaking
    assert codec.encode(m.UtteranceEnd(utterance_id=1, end_ms=2500), 12.0, 0.0) == []


def test_what_sarvam_has_no_message_for_is_not_sent() -> None:
    codec = stt(vad_signals=False)
    assert codec.encode(m.SpeechStarted(at_ms=0), 0.0, 0.0) == []
    assert codec.encode(m.Transcript(utterance_id=1, is_final=False, text="he", start_ms=0,
                                     end_ms=10), 0.0, 0.0) == []
    assert codec.encode(final(""), 0.0, 0.0) == []  # an empty final: no transcript
    for event in (m.Credit(bytes=10), m.Warning(code="credit_exceeded", message="x"),
                  m.Usage(audio_ms=1, billed_ms=1, cost_micros=1),
                  m.Summary(audio_ms=1, billed_ms=1, cost_micros=1, utterances=1,
                            dropped_ms=0)):
        assert codec.encode(event, 0.0, 0.0) == []


def test_an_error_is_sarvams_error_shape() -> None:
    out = stt().encode(m.Error(code="insufficient_balance", message="top up"), 0.0, 0.0)
    assert [json.loads(x) for x in out] == [
        {"type": "error", "data": {"error": "top up", "code": "insufficient_balance"}}]


# --- text to speech -------------------------------------------------------------------------------


def config(**data: Any) -> bytes:
    return json.dumps({"type": "config", "data": {"language_code": "en-IN",
                                                  "speaker": "anushka", **data}}).encode()


def tts(completion_events: bool = True) -> TtsCodec:
    return TtsCodec(completion_events=completion_events, language=None)


def test_a_config_reconfigures_the_session() -> None:
    codec = tts()
    got = codec.decode(config(output_audio_codec="linear16", speech_sample_rate=16000,
                              pitch=0.2, dict_id=None))
    assert got == Reconfigure(m.TtsConfigMsg(language="en-IN", encoding="pcm_s16le",
                                             sample_rate=16000))
    assert codec.decode(config(output_audio_codec="mulaw", speech_sample_rate=8000)) == \
        Reconfigure(m.TtsConfigMsg(language="en-IN", encoding="mulaw", sample_rate=8000))
    # Sarvam's defaults: MP3 at 22050 Hz, made here from the session's PCM.
    assert tts().decode(config()) == Reconfigure(m.TtsConfigMsg(
        language="en-IN", encoding="pcm_s16le", sample_rate=22050))


def test_configs_this_server_cannot_serve_end_the_session() -> None:
    assert isinstance(tts().decode(config(output_audio_codec="aac")), BadConfig)
    assert isinstance(tts().decode(config(output_audio_codec="opus")), BadConfig)  # 22050 Hz
    assert isinstance(tts().decode(config(output_audio_codec="opus", speech_sample_rate=24000)),
                      Reconfigure)


def test_text_flush_and_ping() -> None:
    codec = tts()
    assert codec.decode(b'{"type": "text", "data": {"text": "Hello."}}') == SubmitText("Hello.")
    assert codec.decode(b'{"type": "flush"}') == Flush()
    assert codec.decode(b'{"type": "ping"}') is None
    for raw in (b'{"type": "text", "data": {"text": "  "}}',
                json.dumps({"type": "text", "data": {"text": "a" * (MAX_TTS_TEXT_CHARS + 1)}})
                .encode(),
                b'{"type": "speak"}', b"{", b'{"type": "text"}'):
        got = codec.decode(raw)
        assert isinstance(got, TtsRefused) and got.code == "bad_message", raw


def test_pipecats_config_with_numbers_as_strings() -> None:
    got = tts().decode(json.dumps({"type": "config", "data": {
        "target_language_code": "hi-IN", "speaker": "anushka", "speech_sample_rate": "16000",
        "enable_preprocessing": False, "min_buffer_size": 50, "max_chunk_length": 150,
        "output_audio_codec": "linear16", "output_audio_bitrate": "128k", "pace": 1.0,
        "model": "bulbul:v2"}}).encode())
    assert got == Reconfigure(m.TtsConfigMsg(language="hi-IN", encoding="pcm_s16le",
                                             sample_rate=16000))


def test_a_config_after_text_may_change_only_what_is_ignored() -> None:
    codec = tts()
    codec.decode(config())
    codec.decode(b'{"type": "text", "data": {"text": "Hi."}}')
    assert codec.decode(config()) is None
    assert codec.decode(config(speaker="vidya", pace=1.5)) is None
    assert isinstance(codec.decode(config(speech_sample_rate=8000)), TtsRefused)
    assert isinstance(codec.decode(config(language_code="hi-IN")), TtsRefused)


def audio_of(raw: bytes) -> tuple[str, bytes]:
    msg = json.loads(raw)
    assert msg["type"] == "audio" and msg["data"]["request_id"] == ""
    return msg["data"]["content_type"], base64.b64decode(msg["data"]["audio"])


def test_linear16_and_wav_chunks() -> None:
    codec = tts()
    codec.decode(config(output_audio_codec="linear16"))
    out = codec.audio(b"\x01\x02" * 10)
    assert out is not None and audio_of(out) == ("audio/L16", b"\x01\x02" * 10)
    wav = tts()
    wav.decode(config(output_audio_codec="wav", speech_sample_rate=16000))
    out = wav.audio(b"\0\0" * 160)
    assert out is not None
    ctype, data = audio_of(out)
    samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    assert ctype == "audio/wav" and rate == 16000 and len(samples) == 160


def test_an_mp3_chunk_is_finished_when_its_audio_is_done() -> None:
    codec = tts()
    codec.decode(config())
    tone = (np.sin(np.arange(22050) * 2 * np.pi * 440 / 22050) * 8000).astype("<i2").tobytes()
    parts = [codec.audio(tone[i:i + 4410]) for i in range(0, len(tone), 4410)]
    tail = codec.event(m.AudioDone(chunk_id=1, text="x", duration_ms=1000))
    assert len(tail) == 1
    mp3 = b"".join(audio_of(p)[1] for p in [*parts, *tail] if p is not None)
    samples, rate = soundfile.read(io.BytesIO(mp3), dtype="int16")
    assert rate == 22050 and abs(len(samples) - 22050) < 2 * 1152
    assert codec.event(m.AudioDone(chunk_id=2, text="y", duration_ms=0)) == []


def test_the_completion_event_follows_a_flush_when_asked_for() -> None:
    (event,) = tts().event(m.Flushed())
    msg = json.loads(event)
    assert msg["type"] == "event" and msg["data"]["event_type"] == "final"
    assert tts(completion_events=False).event(m.Flushed()) == []


def test_tts_errors_in_sarvams_shape() -> None:
    (err,) = tts().event(m.Error(code="bad_config", message="no", retryable=False))
    assert json.loads(err) == {"type": "error", "data": {
        "message": "no", "code": 400, "details": {"code": "bad_config", "retryable": False},
        "request_id": ""}}


# --- TTS credit: for audio the socket took --------------------------------------------------------


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.write_paused = False
        self.activity = False
        self.error_frames = True
        self.peer = "test"

    def send_text(self, data: bytes) -> None:
        self.sent.append(data)

    def send_binary(self, data: bytes) -> None:
        raise AssertionError("Sarvam's audio is JSON")

    def flush(self) -> None:
        pass

    def close(self, code: int, reason: str = "") -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class FakeRunner:
    def __init__(self) -> None:
        self.commands: list[object] = []

    def handle(self, command: object) -> None:
        self.commands.append(command)

    def on_writable(self) -> None:
        pass


def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro)


async def test_credit_is_granted_for_audio_the_socket_took_and_not_before() -> None:
    socket = FakeSocket()
    codec = tts()
    codec.decode(config(output_audio_codec="linear16"))
    session = SarvamTtsSession(cast(SessionSocket, socket), codec, spawn)
    runner = FakeRunner()
    session.runner = runner  # type: ignore[assignment]
    session.wire.send_binary(b"\0\0" * 100)
    session.wire.send_binary(b"\0\0" * 100)
    assert runner.commands == []  # never inside the runner's own send
    await asyncio.sleep(0)
    assert runner.commands == [GrantCredit(400)]
    socket.write_paused = True  # the client stopped reading
    session.wire.send_binary(b"\0\0" * 50)
    await asyncio.sleep(0)
    assert runner.commands == [GrantCredit(400)]
    socket.write_paused = False
    session.on_writable()
    assert runner.commands == [GrantCredit(400), GrantCredit(100)]
    assert len(socket.sent) == 3


async def test_mp3_frames_are_encoded_off_the_loop_and_nothing_overtakes_them() -> None:
    socket = FakeSocket()
    closes: list[int] = []
    closed = asyncio.Event()

    def close(code: int, reason: str = "") -> None:
        closes.append(code)
        closed.set()

    socket.close = close  # type: ignore[method-assign]
    codec = tts()
    codec.decode(config())  # MP3
    session = SarvamTtsSession(cast(SessionSocket, socket), codec, spawn)
    runner = FakeRunner()
    session.runner = runner  # type: ignore[assignment]
    wire = session.wire
    tone = (np.sin(np.arange(22050) * 2 * np.pi * 440 / 22050) * 8000).astype("<i2").tobytes()
    for i in range(0, len(tone), 4410):
        wire.send_binary(tone[i:i + 4410])
    wire.send_text(m.encoder.encode(m.AudioDone(chunk_id=1, text="x", duration_ms=1000)))
    wire.send_text(m.encoder.encode(m.Flushed()))
    wire.close(1000)
    assert socket.sent == [] and closes == [] and runner.commands == []  # all waits
    async with asyncio.timeout(5):
        await closed.wait()
    kinds = [json.loads(x)["type"] for x in socket.sent]
    assert kinds[-1] == "event" and set(kinds[:-1]) == {"audio"} and closes == [1000]
    mp3 = b"".join(audio_of(x)[1] for x in socket.sent[:-1])
    samples, rate = soundfile.read(io.BytesIO(mp3), dtype="int16")
    assert rate == 22050 and abs(len(samples) - 22050) < 2 * 1152
    await asyncio.sleep(0)
    # Granted as each frame's message went out: all of it, nothing before.
    assert sum(cast(GrantCredit, c).bytes for c in runner.commands) == len(tone)
