"""Moved to server/protocol/messages.py (issue 12 part 5). A temporary alias for a module whose
import line is not updated yet; it goes once nothing imports it."""

from server.protocol.messages import *  # noqa: F403
