"""Moved to server/protocol/audio.py (issue 12 part 5). A temporary alias for a module whose
import line is not updated yet; it goes once nothing imports it."""

from server.protocol.audio import *  # noqa: F403
