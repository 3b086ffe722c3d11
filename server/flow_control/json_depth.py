"""How deeply a client's JSON may nest, checked before any parser recurses into it.

msgspec (like every recursive-descent parser) recurses once per level of nesting, even into a
field it skips, and stops with RecursionError at the interpreter's limit: about 1,000 levels on
Python 3.11 (less what the stack already holds), about 10,000 on 3.13. An uncaught one killed
the socket. Our own protocol (ASR, TTS) refuses deep documents before parsing, so every version
has the same documented bound, far from the interpreter's.

Cost: no message we send or expect nests more than 4 levels, and a document with at most
MAX_JSON_DEPTH opening brackets cannot nest deeper than that, so a message costs two C-level
`bytes.count` calls (7,000 instructions, ~0.4 us, on 400 bytes); only one with more brackets
than that gets the exact check, linear and in C too. Telephony media arrives every 20 ms per
call, where that would add 37 % to the provider codec's parse; the codecs catch RecursionError
instead, which costs nothing until it happens (docs/decisions/0301-json-depth-and-utf8.md).
"""

from __future__ import annotations

from typing import Final

import numpy as np

# Deepest nesting of arrays and objects accepted in a client or provider text frame (`[]` and
# `{}` are depth 1). Our messages and the providers' nest at most 4 levels; msgspec's own
# limit is about 1000 levels on Python 3.11, less what the stack already holds.
MAX_JSON_DEPTH: Final = 64

# What a provider codec says when msgspec ran out of recursion on a message.
TOO_DEEP: Final = "JSON nested too deeply to parse"

# Everything but the brackets is dropped; `{}` count as `[]`.
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_FOLD_BRACES: Final = bytes.maketrans(b"{}", b"[]")


def nests_deeper_than(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if the JSON text `data` nests arrays and objects more than `limit` levels deep.

    Brackets inside strings do not count. The answer for text that is not JSON is unspecified
    (the parser refuses it anyway), but the check stays linear in `len(data)` for any input."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    # Remove escaped backslashes, then escaped quotes: what is left of `"` delimits strings,
    # so every other piece of a split on it lies outside any string.
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    brackets = outside.translate(_FOLD_BRACES, _NOT_BRACKETS)
    if len(brackets) <= limit:
        return False
    # '[' is 0x5B and ']' is 0x5D: 0x5C minus each byte is +1 for an opener, -1 for a closer,
    # and the running sum is the depth after each bracket.
    steps = 0x5C - np.frombuffer(brackets, dtype=np.uint8).astype(np.int32)
    return int(np.cumsum(steps).max()) > limit
