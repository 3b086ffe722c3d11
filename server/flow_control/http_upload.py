"""Bounds on an audio upload to `POST /v1/asr/transcribe` read before the session starts.

A raw body streams straight into the session pipeline and needs no bound of its own (it is read
only as fast as the pipeline drains). A multipart form cannot stream: a parameter may follow the
file part (`curl -F file=@a.wav -F model=x` sends it in that order), so the file is spooled
until the form has been read to its end and every parameter is known. These bound that spool
and the small parts around it.
"""

from __future__ import annotations

from typing import Final

# The `file` part of a form: beyond this the request is refused with 413. 256 MiB is 70 min of
# 16 kHz PCM16, 23 min of 48 kHz stereo WAV.
MAX_FORM_FILE_BYTES: Final = 256 * 1024 * 1024
# Spooled in memory up to this size, then in an anonymous temporary file on disk.
FORM_FILE_MEMORY_BYTES: Final = 1024 * 1024
# Every other form part is a parameter (`model`, `encoding`, ...): short text.
MAX_FORM_FIELD_BYTES: Final = 1024
MAX_FORM_PARTS: Final = 32
