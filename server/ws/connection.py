"""One WebSocket connection: our own asyncio.Protocol over websockets' sans-I/O ServerProtocol.

websockets' asyncio server costs about half the frames/s of this design (docs/benchmarks.md,
ws-echo against raw-echo): it runs a task per connection and an assembler per message. Here
bytes go straight from data_received into the protocol parser and whole frames go to the
session, with no task hop.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import StatusLike, Subprotocol

from server.protocol.errors import Rejected
from server.sessions.upgrade import Admitted, SessionHandler
from server.ws.handshake import error_frame_payload, json_response
from server.ws.text_error import InvalidText

try:
    from websockets.speedups import apply_mask
except ImportError:  # a websockets built without its C extension
    from websockets.utils import apply_mask

if TYPE_CHECKING:
    from server.ws.server import WsServer

log = logging.getLogger("streamgate.ws")

CLOSE_HANDSHAKE_TIMEOUT_S = 3.0
_BINARY = Opcode.BINARY
_TEXT = Opcode.TEXT
_CONT = Opcode.CONT
_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_OPEN = State.OPEN
_OPCODES = frozenset(int(op) for op in Opcode)  # the ones websockets' parser accepts


def frame_header(opcode: int, length: int) -> bytes:
    """RFC 6455 header of an unmasked, unfragmented server frame (no extensions negotiated).

    Built here rather than by websockets' Frame.serialize: that costs more per credit message
    than the rest of the ingest path's bookkeeping together, and servers never mask."""
    if length < 126:
        return _SMALL_HEADERS[opcode][length]
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


# Headers of small text and binary frames, built once: a `credit` goes out per 20 ms frame.
_SMALL_HEADERS = {op: [bytes((0x80 | op, n)) for n in range(126)] for op in (0x1, 0x2)}


class Utf8ServerProtocol(ServerProtocol):
    """websockets' sans-I/O server, plus RFC 6455 8.1 for text messages: "fail the connection"
    (1007) on invalid UTF-8, even in a field no parser reads.

    websockets leaves that check to its connection classes, which we replace. Raised from
    recv_frame, the error stops websockets' parser at the bad frame as its own errors do: no
    later frame is delivered or answered, and its parser failure path sends the close."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The UTF-8 state of a fragmented text message (a character may span fragments).
        self._text_decoder: codecs.IncrementalDecoder | None = None

    def select_subprotocol(self, subprotocols: Sequence[Subprotocol]) -> Subprotocol | None:
        """Browsers pass the key as `Sec-WebSocket-Protocol: token, <key>`; we answer `token`.
        A client that offers no subprotocol is fine too (websockets' default would refuse it).

        An override, not websockets' `select_subprotocol=` argument: websockets binds that
        with __get__, which a compiled function lacks (docs/native.md)."""
        return Subprotocol("token") if "token" in subprotocols else None

    def reject(self, status: StatusLike, text: str) -> Response:
        """websockets' own refusals (invalid upgrade, request line or headers over its limits,
        which it answers while parsing) in our JSON error shape instead of plain text."""
        code = int(status)
        if code == 505:
            # An upgrade over HTTP/1.0: HTTP/1 is served, the request is what is wrong (RFC 6455
            # 4.2.1 asks for 400), and a 5xx would read as a server fault to monitoring.
            code = 400
        return json_response(code, "bad_request", text.strip() or "invalid WebSocket upgrade")

    def recv_frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op is _TEXT and self.current_size is None:
            data = frame.data  # bytes as parsed; the type allows the views frames are built from
            if not frame.fin:
                self._text_decoder = _utf8_decoder()
                self._check_text(data, self._text_decoder, False)
            elif isinstance(data, memoryview) or not data.isascii():
                self._check_text(data, _utf8_decoder(), True)  # ASCII (nearly all) needs none
        elif op is _CONT and self._text_decoder is not None:
            self._check_text(frame.data, self._text_decoder, frame.fin)
            if frame.fin:
                self._text_decoder = None
        _recv_frame(self, frame)  # not super(): a text frame per 20 ms per telephony call

    @staticmethod
    def _check_text(data: bytes | bytearray | memoryview, decoder: codecs.IncrementalDecoder,
                    final: bool) -> None:
        try:
            decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            raise InvalidText(exc.encoding, exc.object, exc.start, exc.end, exc.reason) from None


_recv_frame = ServerProtocol.recv_frame


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _is_text(data: bytes) -> bool:
    """RFC 6455 8.1: a text message is UTF-8. ASCII (nearly every JSON frame) needs no decode."""
    return data.isascii() or _is_utf8(data)


class WsConnection(asyncio.Protocol):
    __slots__ = (
        "_fast",
        "_frag_op",
        "_frag_parts",
        "_max_size",
        "_out",
        "_parser_error_sent",
        "_pending",
        "_reading",
        "activity",
        "clean_upgrade",
        "close_code",
        "close_deadline",
        "closed",
        "error_frames",
        "handshake_deadline",
        "kind",
        "last_activity",
        "last_pong",
        "path",
        "peer",
        "ping_sent_at",
        "protocol",
        "reading_paused",
        "server",
        "session",
        "transport",
        "write_paused",
    )

    def __init__(self, server: WsServer) -> None:
        self.server = server
        cfg = server.config
        self.protocol = Utf8ServerProtocol(
            max_size=cfg.max_frame_bytes,
            logger=logging.getLogger("streamgate.ws.protocol"),
        )
        self._max_size = cfg.max_frame_bytes
        # The binary fast path (see _receive_fast): on once the session runs, off for good at
        # the first frame websockets must judge on its own (close, oversize, unmasked).
        self._fast = False
        self._pending = b""  # a partial frame the fast path holds: < 14 + max_size bytes
        self.clean_upgrade = False  # no byte after the upgrade request reached websockets
        self.transport: asyncio.Transport | None = None
        self.session: SessionHandler | None = None
        self.peer = ""
        self.path = ""
        now = server.now
        self.handshake_deadline = now + cfg.handshake_timeout_s
        self.kind = ""  # the endpoint's kind (asr, tts, telephony, ...) once routed
        self.last_activity = now
        self.activity = False
        self.ping_sent_at: float | None = None
        self.last_pong = now
        self.close_deadline: float | None = None
        self.close_code: int | None = None
        self.closed = False
        self.reading_paused = False
        self.write_paused = False
        self._frag_op: Opcode | None = None
        self._frag_parts: list[bytes] = []
        self._parser_error_sent = False
        # An `error` frame goes before every close but 1000 on our own protocol; a telephony
        # provider's socket takes only the provider's messages (docs/protocol.md).
        self.error_frames = True
        self._reading = False
        # Data frames we framed ourselves, written before websockets' own output (a close
        # frame must follow the data sent before it).
        self._out: list[bytes] = []

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-compatible.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        cfg = self.server.config
        transport.set_write_buffer_limits(cfg.write_high_water_bytes, cfg.write_low_water_bytes)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        session = self.session
        self._reading = True
        try:
            if self._fast and session is not None:
                self._receive_fast(data, session)
            else:
                self._receive_ws(data, session)
            if session is not None:
                session.on_read_done()
        finally:
            self._reading = False
        self.flush()

    def _receive_ws(self, data: bytes, session: SessionHandler | None) -> None:
        """websockets parses: the handshake, control frames, fragments and every error."""
        p = self.protocol
        p.receive_data(data)
        for event in p.events_received():
            if isinstance(event, Frame):
                # Audio first: whole binary frames go straight to the session.
                if event.opcode is _BINARY and event.fin and session is not None:
                    self.activity = True
                    session.on_binary(bytes(event.data))
                else:
                    self._frame(event)
            elif isinstance(event, Request):
                # Reading pauses until admission decides; if this read ended with the
                # request, websockets holds no frame bytes and the fast path may start.
                # (The first blank line of the read must be its end: a frame's mask key may
                # end in CRLFCRLF too.)
                self.clean_upgrade = data.find(b"\r\n\r\n") == len(data) - 4
                self._request(event)

    def _receive_fast(self, data: bytes, session: SessionHandler) -> None:
        """Whole, masked, unfragmented binary and text frames of an open connection, parsed
        here.

        websockets' generator-based parser costs ~3.5 us per frame, more than our decode and
        VAD together; audio is nearly all a session receives, as binary frames (our protocol)
        or as one JSON text frame per 20 ms (telephony providers). Every other frame is handed
        to websockets whole, so its parser always starts on a frame boundary, and it keeps
        every rule (opcodes, RSV bits, fragments, close). A text frame that is not UTF-8 goes
        to websockets too, which fails the connection (1007) as it would have. A header
        websockets must refuse (over max_size, unmasked) hands it the rest of the stream: it
        fails the connection."""
        n = len(data)
        if not self._pending and n >= 6 and self._frag_op is None:
            # The usual read: exactly one masked audio frame (a 20 ms telephony frame: ~330
            # bytes of JSON, so a 16-bit length).
            b0 = data[0]
            if b0 == 0x82 or b0 == 0x81:
                b1 = data[1]
                length = b1 & 0x7F
                head = 2
                if length == 126:
                    length = (data[2] << 8) | data[3]
                    head = 4
                elif length == 127:  # a 64-bit length: never one small frame
                    length = n
                if b1 & 0x80 and length + head + 4 == n and length <= self._max_size:
                    payload = apply_mask(data[head + 4 :], data[head : head + 4])
                    if b0 == 0x82:
                        self.activity = True
                        session.on_binary(payload)
                        return
                    if payload.isascii() or _is_utf8(payload):
                        self.activity = True
                        session.on_text(payload)
                        return
                    # Not UTF-8: websockets fails the connection, below.
        if self._pending:
            data = self._pending + data
            self._pending = b""
            n = len(data)
        pos = 0
        max_size = self._max_size
        self.activity = True
        while n - pos >= 2:
            b1 = data[pos + 1]
            if not b1 & 0x80 or data[pos] & 0x0F not in _OPCODES:
                # websockets refuses these on their first two bytes: it must see them now, not
                # once the rest of the frame has come (or at our close, behind a pong).
                self._fast = False
                self._receive_ws(data[pos:], session)
                return
            length = b1 & 0x7F
            head = pos + 2
            if length >= 126:
                extra = 2 if length == 126 else 8
                if n - head < extra:
                    break
                length = int.from_bytes(data[head : head + extra], "big")
                head += extra
            # Inside a fragmented message websockets allows a frame only what is left of
            # max_size; over it, the connection fails at the header (1009), as here.
            budget = self.protocol.current_size
            if length > (max_size if budget is None else max_size - budget):
                self._fast = False
                self._receive_ws(data[pos:], session)
                return
            end = head + 4 + length
            if end > n:
                break
            first = data[pos]
            if first == 0x82 and self._frag_op is None:
                session.on_binary(apply_mask(data[head + 4 : end], data[head : head + 4]))
            elif first == 0x81 and self._frag_op is None and _is_text(
                    payload := apply_mask(data[head + 4 : end], data[head : head + 4])):
                session.on_text(payload)
            else:
                self._receive_ws(data[pos:end], session)
                if self.protocol.state is not _OPEN:
                    self._fast = False
            pos = end
            if not self._fast:
                # Closing (by either side): websockets reads what is left, as it discards.
                if pos < n:
                    self._receive_ws(data[pos:], session)
                return
        if pos < n:
            self._pending = data[pos:]

    def _leave_fast(self) -> None:
        """From here on websockets parses; it gets the partial frame we held."""
        self._fast = False
        if self._pending:
            pending, self._pending = self._pending, b""
            self.protocol.receive_data(pending)

    def eof_received(self) -> bool | None:
        self._leave_fast()
        self.protocol.receive_eof()
        self.flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        code = self.close_code
        if code is None and self.protocol.close_rcvd is not None:
            # websockets reports close_code only once CLOSED; the received frame says it now.
            code = self.protocol.close_rcvd.code
        if code is None:
            code = 1006
        if self.session is not None:
            self.session.on_connection_closed(code)
        self.server.connection_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.session is not None:
            self.session.on_writable()

    # --- frames -------------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op is Opcode.BINARY or op is Opcode.TEXT:
            if frame.fin:
                self._deliver(op, bytes(frame.data))
            else:
                self._frag_op, self._frag_parts = op, [bytes(frame.data)]
        elif op is Opcode.CONT:
            # websockets enforces max_size across fragments, so this list's bytes are bounded;
            # empty fragments add nothing to the message and are not kept (their number is not).
            if frame.data:
                self._frag_parts.append(bytes(frame.data))
            if frame.fin and self._frag_op is not None:
                op, self._frag_op = self._frag_op, None
                data, self._frag_parts = b"".join(self._frag_parts), []
                self._deliver(op, data)
        elif op is Opcode.PONG:
            self.ping_sent_at = None
            self.last_pong = self.server.now
        elif op is Opcode.CLOSE:
            # websockets has answered the close; the transport closes on its EOF.
            if self.close_code is None and self.protocol.close_rcvd is not None:
                self.close_code = self.protocol.close_rcvd.code

    def _deliver(self, op: Opcode, data: bytes) -> None:
        self.activity = True
        session = self.session
        if session is None:
            return
        if op is Opcode.BINARY:
            session.on_binary(data)
        else:
            session.on_text(data)

    # --- handshake ----------------------------------------------------------------------------

    def _request(self, request: Request) -> None:
        self.path = request.path
        assert self.transport is not None
        # websockets judges the handshake before admission does: admission authenticates,
        # spends a rate-limit token, counts a concurrent session and reserves a lease, so a
        # request websockets would refuse (not GET, no Upgrade, bad key or version) must never
        # reach it. `accept` only builds the response; nothing is sent or changed until
        # send_response, so the 101 waits for admission.
        response = self.protocol.accept(request)
        if response.status_code != 101:
            self._refuse_handshake(response)
            return
        self.transport.pause_reading()  # nothing to read until the upgrade is decided
        self.server.spawn(self._admit(request, response))

    def _refuse_handshake(self, response: Response) -> None:
        """An invalid WebSocket upgrade: JSON from reject(), sent at the end of this read."""
        status = response.status_code
        self.server.metrics.upgrades_rejected.labels(str(status)).inc()
        log.info("upgrade rejected", extra={"path": self.path.split("?")[0], "status": status,
                                            "code": "bad_request", "peer": self.peer})
        self.protocol.send_response(response)

    async def _admit(self, request: Request, response: Response) -> None:
        try:
            decision = await self.server.router.admit(request, self)
        except Exception:
            log.exception("admission failed")
            decision = Rejected(500, "internal_error", "admission failed")
        if self.closed:
            if isinstance(decision, Admitted):
                decision.cancel()
            return
        if isinstance(decision, Rejected):
            self.protocol.send_response(
                json_response(decision.status, decision.code, decision.message, decision.headers)
            )
            self.flush()
            return
        self.protocol.send_response(response)
        self.flush()
        self.session = decision.start(self)
        self._fast = self.clean_upgrade and self.protocol.state is _OPEN
        self.resume_reading()

    # --- outbound -----------------------------------------------------------------------------

    def send_text(self, data: bytes) -> None:
        if self.protocol.state is _OPEN:
            self._out.append(frame_header(0x1, len(data)) + data)

    def send_binary(self, data: bytes) -> None:
        if self.protocol.state is _OPEN:
            out = self._out
            out.append(frame_header(0x2, len(data)))
            out.append(data)

    def send_ping(self, now: float) -> None:
        if self.protocol.state is State.OPEN:
            self.protocol.send_ping(b"")
            self.ping_sent_at = now
            self.flush()

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the peer gets CLOSE_HANDSHAKE_TIMEOUT_S to answer."""
        if self.protocol.state is State.OPEN:
            self._leave_fast()
            if self.protocol.state is not State.OPEN:
                # The partial frame the fast path held has a header websockets refuses: it
                # failed the connection (as it would have on reading it) and sent its close.
                self.flush()
                return
            self.close_code = code
            self.protocol.send_close(code, reason[:120])
            self.close_deadline = self.server.now + CLOSE_HANDSHAKE_TIMEOUT_S
            self.flush()
        elif self.protocol.state is State.CONNECTING and self.transport is not None:
            self.transport.close()

    def abort(self, code: int = 1006) -> None:
        if self.close_code is None:
            self.close_code = code
        if self.transport is not None:
            self.transport.abort()

    def flush(self) -> None:
        """Write what we framed and what the protocol produced; an empty chunk from the protocol
        means "close the TCP connection".

        Inside data_received this waits for the end of the read: one write per read."""
        if self._reading:
            return
        p = self.protocol
        if p.parser_exc is not None and not self._parser_error_sent:
            self._parser_failed(p.parser_exc)
        chunks = p.data_to_send()
        out = self._out
        if not out and not chunks:
            return
        transport = self.transport
        if transport is None:
            out.clear()
            return
        eof = bool(chunks) and not chunks[-1]
        if out:
            out.extend(chunks)
            payload = b"".join(out)
            out.clear()
        else:
            payload = b"".join(chunks)
        if payload:
            transport.write(payload)
        if eof:
            transport.close()

    def _parser_failed(self, exc: Exception) -> None:
        """websockets already queued its close frame; put our `error` frame ahead of it."""
        self._parser_error_sent = True
        message = str(exc)
        if isinstance(exc, PayloadTooBig):
            code, err = 1009, "frame_too_big"
        elif isinstance(exc, ProtocolError):
            code, err = 1002, "protocol_error"
        elif isinstance(exc, UnicodeDecodeError):
            # RFC 6455 8.1: a text message or a close reason that is not UTF-8.
            code, err = 1007, "invalid_utf8"
            what = "text message" if isinstance(exc, InvalidText) else "close frame reason"
            message = f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        else:
            return  # EOF and the like: nobody to tell
        if self.close_code is not None:
            return  # our close frame, with its code, left before the peer's error
        self.close_code = code
        if self.protocol.close_sent is None or not self.error_frames:
            return
        payload = error_frame_payload(err, message)
        self._out.append(frame_header(0x1, len(payload)) + payload)

    # --- flow control -------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    @property
    def is_open(self) -> bool:
        return self.protocol.state is State.OPEN
