"""The error a text message that is not UTF-8 raises in the WebSocket parser.

A module of its own so server/ws/connection.py can be compiled (docs/native.md): mypyc cannot
compile a subclass of UnicodeDecodeError, and this one is raised only on a protocol error."""

from __future__ import annotations


class InvalidText(UnicodeDecodeError):
    """A text message that is not UTF-8 (a close reason's error is websockets' own)."""
