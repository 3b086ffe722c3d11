"""Live streams for code that produces audio or text as it goes (a microphone, a phone call, an
LLM's tokens): `AsrStream` and `TtsStream`, async, with the protocol's credit handled and every
server message typed (`streamgate_protocol.messages`).

    async with await AsrStream.connect(url, key=key, sample_rate=16000) as asr:
        await asr.send(pcm)            # waits while the server's credit is used up
        await asr.close()              # finals, then `summary`
        async for event in asr:        # Ready, Credit, Transcript, ..., Summary
            ...

    async with await TtsStream.connect(url, key=key) as tts:
        await tts.send_text("Hello there. ")
        await tts.flush()
        async for item in tts:         # audio (bytes) and events (AudioDone, Flushed, ...)
            ...                        # taking audio from the stream grants its credit back

Both are bounded: what the server sends waits in a queue of at most `max_pending` items, and
while it is full the socket is not read (the server's own back pressure then holds it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Final, Generic, Self, TypeVar
from urllib.parse import urlencode

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamgate_protocol import messages as m

__all__ = ["AsrStream", "StreamClosed", "TtsStream"]

MAX_PENDING: Final = 1024  # server messages waiting for the application, per stream
T = TypeVar("T")


class StreamClosed(Exception):
    """The server closed the stream; `code` and `reason` are its close frame's."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code}: {reason}" if reason else f"closed {code}")
        self.code, self.reason = code, reason


class _Stream(Generic[T]):
    def __init__(self, ws: ClientConnection, decoder: msgspec.json.Decoder[T],
                 max_pending: int) -> None:
        self._ws = ws
        self._decoder = decoder
        # None marks the end of the stream (no message decodes to None).
        self._queue: asyncio.Queue[T | dict[str, object] | bytes | None] = asyncio.Queue(
            max_pending)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.ready: m.Ready | None = None

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                if isinstance(raw, bytes):
                    await self._queue.put(raw)
                    continue
                msg: T | dict[str, object]
                try:
                    msg = self._decoder.decode(raw)
                except msgspec.DecodeError:
                    unknown = msgspec.json.decode(raw)  # a message this SDK does not know yet
                    if not isinstance(unknown, dict):
                        continue
                    msg = unknown
                self._seen(msg)
                await self._queue.put(msg)
        except ConnectionClosed:
            pass
        finally:
            await self._queue.put(None)

    def _seen(self, msg: object) -> None:
        """A server message arrived (before the application takes it)."""

    async def _next(self) -> T | dict[str, object] | bytes:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # every later read ends too
            raise StopAsyncIteration
        return item

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    async def aclose(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


async def _open(url: str, key: str | None, params: Mapping[str, str]) -> ClientConnection:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    query = urlencode(dict(params))
    return await connect(f"{url}?{query}" if query else url, additional_headers=headers,
                         compression=None, max_size=2**22)


class AsrStream(_Stream[m.AsrServerMessage]):
    """A live `/v1/asr/stream` session: `send` audio as it is captured; iterate for events."""

    def __init__(self, ws: ClientConnection, max_pending: int) -> None:
        super().__init__(ws, m.asr_server_decoder, max_pending)
        self._granted = 0
        self._sent = 0
        self._credit = asyncio.Event()

    @classmethod
    async def connect(cls, url: str, *, key: str | None, encoding: str = "pcm_s16le",
                      sample_rate: int = 16000, params: Mapping[str, str] | None = None,
                      max_pending: int = MAX_PENDING) -> AsrStream:
        ws = await _open(url, key, {**(params or {}), "encoding": encoding,
                                    "sample_rate": str(sample_rate)})
        stream = cls(ws, max_pending)
        await stream._await_ready()
        return stream

    async def _await_ready(self) -> None:
        while self.ready is None:
            if self._reader.done():
                raise StreamClosed(self._ws.close_code or 1006, self._ws.close_reason or "")
            self._credit.clear()
            await self._credit.wait()

    def _seen(self, msg: object) -> None:
        if isinstance(msg, m.Ready):
            self.ready = msg
            self._granted += msg.credit_bytes
        elif isinstance(msg, m.Credit):
            self._granted += msg.bytes
        else:
            return
        self._credit.set()

    async def send(self, audio: bytes) -> None:
        """Send audio, never more than the server granted: waits for credit as needed."""
        view = memoryview(audio)
        while view:
            available = self._granted - self._sent
            if available <= 0:
                if self._reader.done():
                    raise StreamClosed(self._ws.close_code or 1006, self._ws.close_reason or "")
                self._credit.clear()
                await self._credit.wait()
                continue
            n = min(len(view), available)
            await self._ws.send(bytes(view[:n]))
            self._sent += n
            view = view[n:]

    async def finalize(self) -> None:
        """A final for the utterance in progress now."""
        await self._ws.send(m.encoder.encode(m.Finalize()).decode())

    async def close(self) -> None:
        """No more audio: the server sends the last finals and `summary`, then closes 1000."""
        await self._ws.send(m.encoder.encode(m.Close()).decode())

    def __aiter__(self) -> AsyncIterator[m.AsrServerMessage | dict[str, object]]:
        return self._events()

    async def _events(self) -> AsyncIterator[m.AsrServerMessage | dict[str, object]]:
        while True:
            try:
                item = await self._next()
            except StopAsyncIteration:
                return
            if not isinstance(item, bytes):
                yield item


class TtsStream(_Stream[m.TtsServerMessage]):
    """A live `/v1/tts/stream` session: send text as it is produced; iterate for audio and
    events. Audio taken from the iterator is credited back to the server (it was played)."""

    @classmethod
    async def connect(cls, url: str, *, key: str | None, encoding: str = "pcm_s16le",
                      sample_rate: int = 16000, model: str | None = None,
                      voice: str | None = None, max_pending: int = MAX_PENDING) -> TtsStream:
        params = {"encoding": encoding, "sample_rate": str(sample_rate)}
        if model:
            params["model"] = model
        if voice:
            params["voice"] = voice
        stream = cls(await _open(url, key, params), m.tts_server_decoder, max_pending)
        first = await stream._next()
        if not isinstance(first, m.Ready):
            await stream.aclose()
            raise StreamClosed(stream._ws.close_code or 1006, stream._ws.close_reason or "")
        stream.ready = first
        return stream

    async def send_text(self, text: str) -> None:
        await self._ws.send(m.encoder.encode(m.Text(text=text)).decode())

    async def flush(self) -> None:
        """Speak what is buffered now; `Flushed` follows its audio."""
        await self._ws.send(m.encoder.encode(m.Flush()).decode())

    async def clear(self) -> None:
        """Barge-in: drop buffered text and audio not yet sent; `Cleared` answers."""
        await self._ws.send(m.encoder.encode(m.Clear()).decode())

    async def close(self) -> None:
        """No more text: what is buffered is spoken, then `summary` and close 1000."""
        await self._ws.send(m.encoder.encode(m.Close()).decode())

    def __aiter__(self) -> AsyncIterator[bytes | m.TtsServerMessage | dict[str, object]]:
        return self._items()

    async def _items(self) -> AsyncIterator[bytes | m.TtsServerMessage | dict[str, object]]:
        while True:
            try:
                item = await self._next()
            except StopAsyncIteration:
                return
            if isinstance(item, bytes):
                with contextlib.suppress(ConnectionClosed):  # closed: nothing more to credit
                    await self._ws.send(
                        m.encoder.encode(m.CreditGrant(bytes=len(item))).decode())
            yield item
