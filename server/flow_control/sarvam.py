"""Bounds of the Sarvam dialect (server/compat/sarvam/). A Sarvam message is JSON with base64
audio or text inside; the WebSocket message limit (`server.max_frame_bytes`) bounds each one,
so a decoded payload is at most three quarters of it. What is left to bound is what the codec
itself keeps between messages and what one text message may ask for."""

from __future__ import annotations

from typing import Final

# Sarvam's own limit on one TTS `text` message (its API reference: 1-2500 characters).
MAX_TTS_TEXT_CHARS: Final = 2500
# Arrival times of audio kept to report a final's `metrics.processing_latency`: one mark per
# audio message, the oldest dropped past this many (the latency is then measured from the
# oldest mark kept, an upper bound).
MAX_LATENCY_MARKS: Final = 256
