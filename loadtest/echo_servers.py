"""The two reference servers of the bench: "ack per binary frame", no other work.

    python -m loadtest.echo_servers ws-echo  [--host 127.0.0.1] [--port 0]
    python -m loadtest.echo_servers raw-echo [--host 127.0.0.1] [--port 0]

- ws-echo: websockets' asyncio server (`websockets.asyncio.server.serve`), a handler task per
  connection that answers every binary message with a small text frame.
- raw-echo: an asyncio.Protocol over websockets' sans-I/O `ServerProtocol`, answering inline in
  data_received (no task hop): the ceiling streamgate's design is measured against.

Both run on uvloop and print one JSON line `{"event":"listening","ws_port":N}` on stdout once
they accept connections; SIGTERM/SIGINT stop them (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import cast

import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

ACK_TEXT = "ack"
ACK_BYTES = ACK_TEXT.encode()
BACKLOG = 4096
MAX_SIZE = 65536


# --- (a) websockets asyncio server -------------------------------------------------------------


async def _ws_handler(ws: ServerConnection) -> None:
    async for message in ws:
        if isinstance(message, bytes):
            await ws.send(ACK_TEXT)


async def run_ws_echo(host: str, port: int, stop: asyncio.Event) -> None:
    async with serve(
        _ws_handler, host, port, compression=None, max_size=MAX_SIZE, backlog=BACKLOG
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        _announce(bound)
        await stop.wait()


# --- (b) raw asyncio.Protocol + websockets sans-I/O ---------------------------------------------


class RawEchoProtocol(asyncio.Protocol):
    __slots__ = ("proto", "transport")

    def __init__(self) -> None:
        self.proto = ServerProtocol(max_size=MAX_SIZE)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        p = self.proto
        p.receive_data(data)
        for event in p.events_received():
            if isinstance(event, Frame):
                if event.opcode is Opcode.BINARY:
                    p.send_text(ACK_BYTES)
            elif isinstance(event, Request):
                p.send_response(p.accept(event))
        self._flush()

    def eof_received(self) -> bool | None:
        self.proto.receive_eof()
        self._flush()
        return None

    def _flush(self) -> None:
        chunks = self.proto.data_to_send()
        if not chunks or self.transport is None:
            return
        payload = b"".join(chunks)
        if payload:
            self.transport.write(payload)
        if not chunks[-1]:  # an empty chunk means "close the TCP connection"
            self.transport.close()


async def run_raw_echo(host: str, port: int, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawEchoProtocol, host, port, backlog=BACKLOG)
    _announce(server.sockets[0].getsockname()[1])
    await stop.wait()
    server.close()


# --- CLI ---------------------------------------------------------------------------------------


def _announce(port: int) -> None:
    print(json.dumps({"event": "listening", "ws_port": port}), flush=True)


async def _main(kind: str, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if kind == "ws-echo":
        await run_ws_echo(host, port, stop)
    else:
        await run_raw_echo(host, port, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.echo_servers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("ws-echo", "raw-echo"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    uvloop.run(_main(args.kind, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
