"""Server frames we build ourselves must be byte-identical to websockets' own serializer."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from server.ws.connection import frame_header


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_frame_header_matches_websockets(opcode: Opcode, length: int) -> None:
    payload = bytes(range(256)) * (length // 256) + bytes(range(length % 256))
    if opcode is Opcode.TEXT:
        payload = b"a" * length
    ours = frame_header(int(opcode), len(payload)) + payload
    theirs = Frame(opcode, payload).serialize(mask=False, extensions=[])
    assert ours == theirs
