"""A deliberately naive WebSocket client over a raw socket: it sends whatever bytes a case
generates (any header, any frame) and reads what the server answers, frame by frame."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

READ_TIMEOUT_S = 10.0  # the server answers every case well within this; a hang is a failure


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True,
          claimed_length: int | None = None) -> bytes:
    """One client frame; `claimed_length` puts another length in the header than the payload's
    (only ever larger than the server's max frame size, so the server refuses the header)."""
    length = len(payload) if claimed_length is None else claimed_length
    head = bytes([(0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)])
    mask_bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(obj: Any) -> bytes:
    return frame(0x1, json.dumps(obj).encode())


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return frame(0x8, struct.pack("!H", code) + reason)


def upgrade_request(path: str, headers: list[tuple[str, str]], method: str = "GET",
                    version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def good_upgrade_headers(port: int, key: str | None = None) -> list[tuple[str, str]]:
    headers = [
        ("Host", f"127.0.0.1:{port}"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode()),
        ("Sec-WebSocket-Version", "13"),
    ]
    if key is not None:
        headers.append(("Authorization", f"Bearer {key}"))
    return headers


@dataclass
class ServerFrame:
    opcode: int
    payload: bytes


@dataclass
class Outcome:
    """What the server answered: the HTTP status of the upgrade, then its frames until it closed
    (close_code None: it closed the TCP connection without a close frame)."""

    status: int | None = None
    response_head: bytes = b""
    response_body: bytes = b""
    frames: list[ServerFrame] = field(default_factory=list)
    close_code: int | None = None
    eof: bool = False
    timed_out: bool = False

    def messages(self) -> list[dict[str, Any]]:
        out = []
        for f in self.frames:
            if f.opcode == 0x1:
                out.append(json.loads(f.payload))
        return out

    def describe(self) -> str:
        msgs = [m.get("type") for m in self.messages()]
        return (f"status={self.status} close={self.close_code} eof={self.eof} "
                f"timed_out={self.timed_out} messages={msgs[-6:]}")


class RawClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S)
        self.buf = b""
        self.outcome = Outcome()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """False if the server has already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.outcome.timed_out = True
            return False
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            self.outcome.timed_out = True
            return False
        except OSError:  # reset by the server
            chunk = b""
        if not chunk:
            self.outcome.eof = True
            return False
        self.buf += chunk
        return True

    def read_response(self, timeout: float = READ_TIMEOUT_S) -> Outcome:
        """The upgrade's HTTP response (and its body when it is not a 101)."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if not self._fill(deadline):
                return self.outcome
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.outcome.response_head = head
        status_line = head.split(b"\r\n", 1)[0].split(b" ")
        self.outcome.status = int(status_line[1])
        if self.outcome.status != 101:
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(self.buf) < length and self._fill(deadline):
                pass
            self.outcome.response_body = self.buf[:length]
        return self.outcome

    def read_frames(self, timeout: float = READ_TIMEOUT_S,
                    until_type: str | None = None) -> Outcome:
        """Server frames until its close frame, EOF, the timeout, or (if given) a text message
        of type `until_type`."""
        deadline = time.monotonic() + timeout
        out = self.outcome
        while True:
            parsed = self._parse_one()
            if parsed is None:
                if not self._fill(deadline):
                    return out
                continue
            out.frames.append(parsed)
            if parsed.opcode == 0x8:
                out.close_code = struct.unpack("!H", parsed.payload[:2])[0] \
                    if len(parsed.payload) >= 2 else 1005
                return out
            if until_type is not None and parsed.opcode == 0x1 and \
                    json.loads(parsed.payload).get("type") == until_type:
                return out

    def _parse_one(self) -> ServerFrame | None:
        b = self.buf
        if len(b) < 2:
            return None
        length, pos = b[1] & 0x7F, 2
        if length == 126:
            if len(b) < 4:
                return None
            length, pos = struct.unpack("!H", b[2:4])[0], 4
        elif length == 127:
            if len(b) < 10:
                return None
            length, pos = struct.unpack("!Q", b[2:10])[0], 10
        assert not b[1] & 0x80, "a server frame must not be masked"
        if len(b) < pos + length:
            return None
        self.buf = b[pos + length:]
        return ServerFrame(b[0] & 0x0F, b[pos:pos + length])


def open_session(port: int, path: str, key: str) -> RawClient:
    """A raw client past a good upgrade (101) and the session's `ready`."""
    client = RawClient(port)
    client.send(upgrade_request(path, good_upgrade_headers(port, key)))
    out = client.read_response()
    assert out.status == 101, (path, out.describe(), out.response_body)
    if "telephony" not in path:
        client.read_frames(until_type="ready")
        assert out.messages() and out.messages()[-1]["type"] == "ready", out.describe()
    return client
