"""The bound on the JSON body of `POST /v1/audio/speech` (server/http/openai_audio.py).

Sized so that the longest text a session takes (100,000 characters, as /v1/tts/synthesize)
fits even when every character is sent as a JSON-escaped surrogate pair (`\\ud83d\\ude00`, 12
bytes): a text one character too long is then refused for its length (400) rather than for the
body's size (413), and nothing larger is read into memory.
"""

from __future__ import annotations

from typing import Final

MAX_SPEECH_TEXT_CHARS: Final = 100_000
MAX_SPEECH_BODY_BYTES: Final = 12 * MAX_SPEECH_TEXT_CHARS + 64 * 1024
