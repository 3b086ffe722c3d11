"""Sarvam's streaming speech-to-text and text-to-speech WebSockets, as its API reference and
its `sarvamai` SDK define them, served by our own ASR and TTS sessions (docs/compat.md)."""
