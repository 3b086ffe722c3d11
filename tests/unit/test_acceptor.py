"""Connections are accepted in batches even when the loop is busy (uvloop accepts one per
iteration, which admitted ~30 upgrades/s under load)."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from typing import Any

import pytest
import uvloop

from server.ws import acceptor as acceptor_mod
from server.ws.acceptor import BatchAcceptor, listening_sockets


class Counting(asyncio.Protocol):
    made: list[asyncio.BaseTransport] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)


def _connect_all(port: int, n: int, out: list[socket.socket]) -> None:
    for _ in range(n):
        out.append(socket.create_connection(("127.0.0.1", port)))


def test_a_queue_of_connections_is_accepted_within_a_few_busy_iterations() -> None:
    async def scenario() -> tuple[int, int]:
        made: list[asyncio.BaseTransport] = []
        Counting.made = made
        loop = asyncio.get_running_loop()
        [sock] = listening_sockets("127.0.0.1", 0, backlog=512, reuse_port=False)
        tasks: set[asyncio.Task[Any]] = set()

        def spawn(coro: Any) -> None:
            task = loop.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        acc = BatchAcceptor(sock, Counting, spawn)
        clients: list[socket.socket] = []
        # Every connection waits in the listen queue before the loop looks at the socket.
        th = threading.Thread(target=_connect_all, args=(sock.getsockname()[1], 200, clients))
        th.start()
        th.join()
        acc.start()
        iterations = 0
        while len(made) < 200 and iterations < 50:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.005:  # a loop kept busy by sessions
                pass
            iterations += 1
            await asyncio.sleep(0)
        for t in made:
            t.close()
        acc.close()
        for c in clients:
            c.close()
        await asyncio.sleep(0)
        return len(made), iterations

    made, iterations = uvloop.run(scenario())
    assert made == 200
    # 200 / 128 per readiness: 2 accepts, then the transports' connection_made calls.
    assert iterations <= 6


def test_out_of_descriptors_pauses_accepting_then_resumes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(acceptor_mod, "RESOURCE_PAUSE_S", 0.05)

    class ExhaustedOnce:
        """A listening socket whose first accept() finds the process out of descriptors."""

        def __init__(self, real: socket.socket) -> None:
            self.real = real
            self.failed = False

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        def accept(self) -> tuple[socket.socket, Any]:
            if not self.failed:
                self.failed = True
                raise OSError(errno.EMFILE, "Too many open files")
            return self.real.accept()

    async def scenario() -> int:
        made: list[asyncio.BaseTransport] = []
        Counting.made = made
        loop = asyncio.get_running_loop()
        [real] = listening_sockets("127.0.0.1", 0, backlog=16, reuse_port=False)
        fake = ExhaustedOnce(real)
        tasks: set[asyncio.Task[Any]] = set()

        def spawn(coro: Any) -> None:
            task = loop.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        acc = BatchAcceptor(fake, Counting, spawn)  # type: ignore[arg-type]
        acc.start()
        client = socket.create_connection(("127.0.0.1", real.getsockname()[1]))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if made:
                break
        assert fake.failed and acc._paused is None  # paused once, then resumed
        for t in made:
            t.close()
        acc.close()
        client.close()
        await asyncio.sleep(0)
        return len(made)

    assert uvloop.run(scenario()) == 1


def test_listening_sockets_bind_every_address_and_close_on_failure() -> None:
    [sock] = listening_sockets("127.0.0.1", 0, backlog=8, reuse_port=True)
    try:
        port = sock.getsockname()[1]
        assert sock.getblocking() is False
        with pytest.raises(OSError):
            listening_sockets("127.0.0.1", port, backlog=8, reuse_port=False)
    finally:
        sock.close()
