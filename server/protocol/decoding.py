"""Client text frames decoded at the edge of a session: the wire's JSON into one of the typed
messages of `streamgate_protocol.messages`, refused before parsing when nested deeper than the
bound (server/flow_control/json_depth.py), with the error a client can act on."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from server.flow_control.json_depth import MAX_JSON_DEPTH, nests_deeper_than

T = TypeVar("T")


class BadMessage(Exception):
    """A client text frame that is not a valid message; the session answers `bad_message`."""


_any_decoder = msgspec.json.Decoder()


def decode_client_message(data: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    # Before any parsing: msgspec recurses per level, even into fields it skips.
    if nests_deeper_than(data):
        raise BadMessage(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        # Tell "not JSON" from "JSON of the wrong shape": clients debug these differently.
        try:
            obj = _any_decoder.decode(data)
        except msgspec.DecodeError:
            raise BadMessage(f"malformed JSON: {exc}") from None
        if not isinstance(obj, dict) or "type" not in obj:
            raise BadMessage("a message must be a JSON object with a 'type' field") from None
        raise BadMessage(f"invalid message: {exc}") from None
