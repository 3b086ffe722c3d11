"""The Deepgram dialect's codec (server/compat/deepgram/codec.py), run_test style: Deepgram's
query strings and client frames in, our parameters and typed commands out; our typed events
in, Deepgram's JSON out. Shapes as Deepgram's API reference and deepgram-sdk 7.x define them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest

from server.compat.deepgram.codec import (
    ENDPOINTING_OFF_MS,
    BadClientMessage,
    ConfigureFailure,
    ConfigureSuccess,
    DialectError,
    ListenCodec,
    SpeakCodec,
    listen_options,
    speak_options,
)
from server.compat.deepgram.wire import deepgram_close
from server.sessions import tts
from streamgate_protocol import messages as m

MODELS = ("synthetic", "sphinx-en")


def listen(**query: str) -> ListenCodec:
    return ListenCodec(listen_options(query, models=MODELS, default_model="sphinx-en"))


def run_test(codec: ListenCodec, inputs: Iterable[bytes | str | m.AsrServerMessage]
             ) -> list[Any]:
    """Audio (bytes), client text (str) and our events in order -> what each produced: our
    control message or a Configure answer for text, Deepgram's JSON (decoded) for events."""
    out: list[Any] = []
    for item in inputs:
        if isinstance(item, bytes):
            codec.audio(item)
        elif isinstance(item, str):
            out.append(codec.decode(item.encode()))
        else:
            out += [json.loads(payload) for payload in codec.encode(item)]
    return out


def transcript(utt: int, start: int, end: int, *, final: bool, text: str = "hello world"
               ) -> m.Transcript:
    words = [m.Word(word=w, start_ms=start + i * 100, end_ms=start + i * 100 + 80,
                    confidence=0.9) for i, w in enumerate(text.split())]
    return m.Transcript(utterance_id=utt, is_final=final, text=text, start_ms=start,
                        end_ms=end, words=words)


# --- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "ours"), [
    ({"model": "nova-3", "encoding": "linear16", "sample_rate": "16000"},
     {"model": "sphinx-en", "encoding": "pcm_s16le", "sample_rate": "16000",
      "interim_results": "false"}),
    ({"model": "synthetic", "encoding": "mulaw", "sample_rate": "8000", "channels": "1",
      "interim_results": "true", "endpointing": "300", "language": "en-GB"},
     {"model": "synthetic", "encoding": "mulaw", "sample_rate": "8000",
      "interim_results": "true", "endpointing_ms": "300", "language": "en-GB"}),
    ({"encoding": "alaw", "sample_rate": "8000", "endpointing": "false", "language": "multi"},
     {"model": "sphinx-en", "encoding": "alaw", "sample_rate": "8000",
      "interim_results": "false", "endpointing_ms": str(ENDPOINTING_OFF_MS)}),
    ({}, {"model": "sphinx-en", "encoding": "wav", "interim_results": "false"}),
    ({"encoding": "linear16", "sample_rate": "16000", "punctuate": "true",
      "smart_format": "true", "diarize": "true", "keyterm": "x", "redact": "false"},
     {"model": "sphinx-en", "encoding": "pcm_s16le", "sample_rate": "16000",
      "interim_results": "false"}),
])
def test_listen_parameters_become_ours(query: dict[str, str], ours: dict[str, str]) -> None:
    options = listen_options(query, models=MODELS, default_model="sphinx-en")
    assert options.query == ours


def test_listen_dialect_options() -> None:
    options = listen_options({"encoding": "linear16", "sample_rate": "16000",
                              "vad_events": "True", "utterance_end_ms": "1000",
                              "punctuate": "true", "smart_format": "true"},
                             models=MODELS, default_model="synthetic")
    assert options.vad_events and options.utterance_end and not options.interim_results
    assert options.ignored == ("punctuate", "smart_format")
    assert (options.sample_rate, options.sample_width) == (16000, 2)


@pytest.mark.parametrize(("query", "why"), [
    ({"encoding": "opus", "sample_rate": "48000"}, "encoding 'opus' is not supported"),
    ({"encoding": "linear16"}, "sample_rate is required"),
    ({"encoding": "linear16", "sample_rate": "16000", "channels": "2"}, "only mono"),
    ({"encoding": "linear16", "sample_rate": "16000", "multichannel": "true"}, "multichannel"),
    ({"encoding": "linear16", "sample_rate": "96000"}, "sample_rate must be 8000-48000"),
    ({"encoding": "linear16", "sample_rate": "16k"}, "whole number"),
    ({"encoding": "linear16", "sample_rate": "16000", "endpointing": "5"}, "10-10000"),
    ({"encoding": "linear16", "sample_rate": "16000", "interim_results": "maybe"},
     "true or false"),
    ({"callback": "https://example.com/hook"}, "callback is not supported"),
    ({"redact": "pci"}, "redact is not supported"),
])
def test_listen_refusals(query: dict[str, str], why: str) -> None:
    with pytest.raises(DialectError, match=why):
        listen_options(query, models=MODELS, default_model="synthetic")


# --- listen: client messages ------------------------------------------------------------------


def test_client_messages_become_our_commands() -> None:
    codec = listen(encoding="linear16", sample_rate="16000")
    out = run_test(codec, ['{"type":"KeepAlive"}', '{"type":"Finalize"}',
                           '{"type":"Finalize","channel":0}', '{"type":"CloseStream"}',
                           '{"type":"Configure","features":{"numerals":true}}',
                           '{"type":"Configure","keyterms":["streamgate"]}'])
    assert [type(x) for x in out] == [m.KeepAlive, m.Finalize, m.Finalize, m.Close,
                                      ConfigureSuccess, ConfigureFailure]
    assert out[-1].code == "CONFIGURE_KEYTERMS_NOT_SUPPORTED"
    assert json.loads(codec.encode_reply(out[-1]))["type"] == "ConfigureFailure"


@pytest.mark.parametrize("frame", [
    "{oops", '{"type":"Jump"}', "[1,2]", '{"text":"no type"}', '{"type":"Finalize",'
    '"channel":"zero"}', "[" * 65 + "]" * 65])
def test_bad_client_messages_are_refused(frame: str) -> None:
    with pytest.raises(BadClientMessage):
        listen().decode(frame.encode())


# --- listen: events -------------------------------------------------------------------------


def test_results_speech_final_from_finalize_and_metadata() -> None:
    codec = listen(encoding="linear16", sample_rate="16000", interim_results="true",
                   vad_events="true", utterance_end_ms="1000")
    second = b"\x00\x00" * 16000  # 1 s of audio, then Finalize at 2000 ms
    out = run_test(codec, [
        b"\x00\x00" * 16000,
        m.Ready(session_id="s", resume_token="", audio=m.AudioFormat(encoding="pcm_s16le",
                                                                      sample_rate=16000),
                credit_bytes=1, limits=m.Limits(max_frame_bytes=1, idle_timeout_s=1,
                                                usage_interval_s=1, max_utterance_ms=1),
                model="sphinx-en"),
        m.Credit(bytes=3200),
        m.SpeechStarted(at_ms=200),
        transcript(1, 200, 500, final=False, text="hello"),
        transcript(1, 200, 700, final=True),  # the VAD ended it: the speaker paused
        m.UtteranceEnd(utterance_id=1, end_ms=700),
        m.SpeechStarted(at_ms=1500),
        second, '{"type":"Finalize"}',
        transcript(2, 1500, 2000, final=True, text="finalized"),  # ended by the Finalize
        m.UtteranceEnd(utterance_id=2, end_ms=2000),
        '{"type":"CloseStream"}',
        m.Usage(audio_ms=2000, billed_ms=2000, cost_micros=1),
        m.Summary(audio_ms=2000, billed_ms=2000, cost_micros=1, utterances=2, dropped_ms=0),
    ])
    shapes = [(x.get("type"), x.get("is_final"), x.get("speech_final"), x.get("from_finalize"))
              if isinstance(x, dict) else type(x).__name__ for x in out]
    assert shapes == [
        ("SpeechStarted", None, None, None),
        ("Results", False, False, False),
        ("Results", True, True, False),
        ("UtteranceEnd", None, None, None),
        ("SpeechStarted", None, None, None),
        "Finalize",
        ("Results", True, False, True),
        ("UtteranceEnd", None, None, None),
        "Close",
        ("Metadata", None, None, None),
    ]
    first_final = out[2]
    assert first_final["channel_index"] == [0, 1]
    assert (first_final["start"], first_final["duration"]) == (0.2, 0.5)
    alt = first_final["channel"]["alternatives"][0]
    assert alt["transcript"] == "hello world" and alt["confidence"] == 0.9
    assert alt["words"][1] == {"word": "world", "start": 0.3, "end": 0.38, "confidence": 0.9,
                               "punctuated_word": "world"}
    assert first_final["metadata"]["model_info"]["name"] == "sphinx-en"
    assert first_final["metadata"]["request_id"] == codec.request_id
    assert out[0] == {"type": "SpeechStarted", "channel": [0, 1], "timestamp": 0.2}
    assert out[3] == {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 0.38}
    metadata = out[-1]
    assert metadata["duration"] == 2.0 and metadata["channels"] == 1
    assert len(metadata["sha256"]) == 64 and metadata["request_id"] == codec.request_id


def test_a_final_the_vad_ended_before_a_finalize_is_still_speech_final() -> None:
    codec = listen(encoding="mulaw", sample_rate="8000")  # one byte per sample
    out = run_test(codec, [
        b"\xff" * 8000, '{"type":"Finalize"}',  # at 1000 ms; no utterance was open
        b"\xff" * 8000,
        transcript(1, 1100, 1500, final=True),  # later, ended by the VAD
        b"\xff" * 800, '{"type":"CloseStream"}',  # at 2100 ms, ends utterance 2
        transcript(2, 1900, 2100, final=True),
    ])
    results = [x for x in out if isinstance(x, dict)]
    assert [(r["speech_final"], r["from_finalize"]) for r in results] == [
        (False, True),  # the empty answer to the Finalize, once a later final shows it ended none
        (True, False), (False, False)]


def test_a_finalize_that_ended_no_utterance_gets_an_empty_final() -> None:
    codec = listen(encoding="linear16", sample_rate="16000")
    run_test(codec, [m.SpeechStarted(at_ms=100), b"\x00\x00" * 16000, '{"type":"Finalize"}'])
    # Read past it, but utterance 1 (begun before it) may still be what it ended: wait.
    assert codec.answer_finalizes(1000) == []
    out = run_test(codec, [transcript(1, 100, 600, final=True),  # the VAD had ended it
                           m.UtteranceEnd(utterance_id=1, end_ms=600)])
    assert out[0]["speech_final"] and not out[0]["from_finalize"]
    assert codec.answer_finalizes(990) == []  # not read that far yet
    [answer] = [json.loads(p) for p in codec.answer_finalizes(1000)]
    assert answer["is_final"] and answer["from_finalize"] and not answer["speech_final"]
    assert answer["channel"]["alternatives"][0]["transcript"] == ""
    assert (answer["start"], answer["duration"]) == (0.6, 0.4)
    assert not codec.finalize_pending and codec.answer_finalizes(5000) == []
    # A later utterance's final answers a Finalize before it that nothing else will.
    run_test(codec, [b"\x00\x00" * 1600, '{"type":"Finalize"}', m.SpeechStarted(at_ms=1500)])
    out = run_test(codec, [transcript(2, 1500, 1900, final=True)])
    assert [(r["from_finalize"], r["channel"]["alternatives"][0]["transcript"]) for r in out] \
        == [(True, ""), (False, "hello world")]


def test_events_deepgram_has_no_message_for_are_not_sent() -> None:
    codec = listen()  # no vad_events, no utterance_end_ms
    out = run_test(codec, [
        m.Credit(bytes=1), m.SpeechStarted(at_ms=1), m.UtteranceEnd(utterance_id=1, end_ms=2),
        m.Checkpoint(offset=1, utterance_id=1), m.Warning(code="balance_low", message="x"),
        m.Error(code="engine_error", message="utterance 1 not transcribed")])
    assert out == [{"type": "Error", "variant": "engine_error",
                    "description": "utterance 1 not transcribed"}]


def test_deepgram_closes() -> None:
    assert deepgram_close(4400, "bad_audio") == (1008, "DATA-0000")
    assert deepgram_close(4008, "idle_timeout") == (1011, "NET-0001")
    assert deepgram_close(4002, "insufficient_balance") == (4002, "insufficient_balance")
    assert deepgram_close(1000, "") == (1000, "")


# --- speak ------------------------------------------------------------------------------------


def test_speak_parameters() -> None:
    options = speak_options({"model": "aura-2-thalia-en", "encoding": "mulaw",
                             "bit_rate": "32000", "speed": "1.2"},
                            models=("espeak-en",), default_model="espeak-en")
    assert options.query == {"model": "espeak-en", "encoding": "mulaw", "sample_rate": "8000"}
    assert options.asked_model == "aura-2-thalia-en"
    assert options.ignored == ("bit_rate", "speed")
    default = speak_options({}, models=("espeak-en",), default_model="espeak-en")
    assert default.query == {"model": "espeak-en", "encoding": "pcm_s16le",
                             "sample_rate": "24000"}
    for query in ({"encoding": "mp3"}, {"container": "wav"}, {"sample_rate": "4000"}):
        with pytest.raises(DialectError):
            speak_options(query, models=("espeak-en",), default_model="espeak-en")


def test_speak_messages_and_sequence_ids() -> None:
    codec = SpeakCodec(speak_options({}, models=("espeak-en",), default_model="espeak-en"))
    # Client frames and our events in the order a session sees them: a Clear answers at once.
    inputs: list[str | m.TtsServerMessage] = [
        '{"type":"Speak","text":"Hello."}', '{"type":"Flush"}', m.Flushed(),
        '{"type":"Flush"}', '{"type":"Clear"}', m.Cleared(),  # the second Flush is dropped
        '{"type":"Flush"}', m.AudioDone(chunk_id=1, text="Hello.", duration_ms=500),
        m.Flushed(), m.Error(code="text_too_long", message="too long"),
        m.TtsUsage(characters=6, audio_ms=500, cost_micros=1), '{"type":"Close"}',
        '{"type":"KeepAlive"}']
    out: list[object] = []
    for item in inputs:
        if isinstance(item, str):
            out.append(codec.decode(item.encode()))
        elif (payload := codec.encode(item)) is not None:
            out.append(json.loads(payload))
    assert out == [tts.SubmitText("Hello."), tts.Flush(), {"type": "Flushed", "sequence_id": 0},
                   tts.Flush(), tts.Interrupt(), {"type": "Cleared", "sequence_id": 0},
                   tts.Flush(), {"type": "Flushed", "sequence_id": 2},
                   {"type": "Warning", "description": "too long", "code": "text_too_long"},
                   tts.EndInput(), None]
    with pytest.raises(BadClientMessage):
        codec.decode(b'{"type":"Speak"}')
