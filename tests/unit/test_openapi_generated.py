"""/openapi.json bodies are generated from the msgspec Structs that validate them (issue 12
part 5), in OpenAPI 3.0 dialect."""

from __future__ import annotations

from typing import Literal

import msgspec
from aiohttp import web

from server.http.openapi import components, document, ref
from server.http.speech import SynthesizeRequest, TranscribeResponse
from server.protocol.errors import ErrorBody, ErrorEnvelope


class _Choice(msgspec.Struct):
    mode: Literal["a", "b"] | None = None


def test_a_nullable_enum_lists_null() -> None:
    """OpenAPI 3.0: `nullable` does not extend an enum, so null must be one of its values."""
    mode = components(_Choice)["_Choice"]["properties"]["mode"]
    assert mode["nullable"] is True and mode["type"] == "string"
    assert mode["enum"] == ["a", "b", None]


def test_the_synthesize_body_documents_what_it_validates() -> None:
    props = components(SynthesizeRequest)["SynthesizeRequest"]["properties"]
    assert (props["text"]["minLength"], props["text"]["maxLength"]) == (1, 100_000)
    assert (props["sample_rate"]["minimum"], props["sample_rate"]["maximum"]) == (8000, 48000)
    assert set(props["encoding"]["enum"]) == {"pcm_s16le", "mulaw", "alaw", "wav", None}
    decode = msgspec.json.Decoder(SynthesizeRequest).decode
    for bad in (b'{"text":""}', b'{"text":"hi","sample_rate":7999}',
                b'{"text":"hi","encoding":"mp3"}', b'{"text":"hi","voice":""}'):
        try:
            decode(bad)
        except msgspec.ValidationError:
            continue
        raise AssertionError(f"{bad!r} is outside the documented schema but was accepted")


def test_the_transcribe_answer_is_a_component() -> None:
    schemas = components(TranscribeResponse)
    assert schemas["TranscribeResponse"]["required"] == ["text", "utterances", "audio_ms",
                                                         "cost_micros"]
    assert schemas["TranscribeResponse"]["properties"]["utterances"]["items"] == {
        "$ref": "#/components/schemas/TranscribedUtterance"}
    assert "Word" in schemas


def test_the_error_component_is_the_envelope_every_refusal_sends() -> None:
    schemas = document(web.Application())["components"]["schemas"]
    assert schemas["Error"]["required"] == ["error"]
    assert schemas["Error"]["properties"]["error"] == ref(ErrorBody)
    assert schemas["ErrorBody"]["required"] == ["code", "message"]
    body = msgspec.json.encode(ErrorEnvelope(ErrorBody("rate_limited", "slow down")))
    assert body == b'{"error":{"code":"rate_limited","message":"slow down"}}'
