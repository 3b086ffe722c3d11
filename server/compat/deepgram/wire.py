"""The socket as a session of the Deepgram dialect sees it: our `Wire`, with the closes that
Deepgram defines spelt Deepgram's way, the audio written counted (a `/v1/speak` client grants
no credit: what the socket took is the credit), and reading held while the client does not
read (`hold_while_not_written`: credit becomes TCP back pressure both ways).

Deepgram ends a stream that sends undecodable audio with 1008 `DATA-0000` and one that stays
silent past its timeout with 1011 `NET-0001`; every other close keeps our code and reason
(server/protocol/errors.py), which Deepgram's clients surface as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from server.sessions.upgrade import SessionSocket

DEEPGRAM_CLOSES: Final[Mapping[str, tuple[int, str]]] = {
    "bad_audio": (1008, "DATA-0000"),
    "idle_timeout": (1011, "NET-0001"),
}


def deepgram_close(code: int, reason: str) -> tuple[int, str]:
    return DEEPGRAM_CLOSES.get(reason, (code, reason))


class DeepgramWire:
    """Our `Wire` over the accepted socket: closes translated, binary bytes reported."""

    __slots__ = ("_held", "_on_audio_sent", "_paused", "_session_paused", "socket")

    def __init__(self, socket: SessionSocket,
                 on_audio_sent: Callable[[int], None] | None = None) -> None:
        self.socket = socket
        self._on_audio_sent = on_audio_sent
        self._session_paused = False  # the session asked (its bound is full)
        self._held = False  # held while the client does not read what we write
        self._paused = False  # what the socket was told

    @property
    def held(self) -> bool:
        return self._held

    def hold_while_not_written(self) -> None:
        """Stop reading while the socket's write buffer is above its high mark: a client
        that does not read what we send is not read either (`written` lifts it)."""
        if self.socket.write_paused and not self._held:
            self._held = True
            self._apply()

    def written(self) -> None:
        """The socket drained below its low mark."""
        if self._held:
            self._held = False
            self._apply()

    def _apply(self) -> None:
        paused = self._session_paused or self._held
        if paused != self._paused:
            self._paused = paused
            if paused:
                self.socket.pause_reading()
            else:
                self.socket.resume_reading()

    @property
    def write_paused(self) -> bool:
        return self.socket.write_paused

    def send_text(self, data: bytes) -> None:
        self.socket.send_text(data)

    def send_binary(self, data: bytes) -> None:
        self.socket.send_binary(data)
        if self._on_audio_sent is not None:
            self._on_audio_sent(len(data))

    def flush(self) -> None:
        self.socket.flush()

    def close(self, code: int, reason: str = "") -> None:
        self.socket.close(*deepgram_close(code, reason))

    def pause_reading(self) -> None:
        self._session_paused = True
        self._apply()

    def resume_reading(self) -> None:
        self._session_paused = False
        self._apply()
