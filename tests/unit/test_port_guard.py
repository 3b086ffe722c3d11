"""Port claims: one deployment per port, named refusals, members of one deployment share."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
import uvloop

from server.ws.port_guard import PortInUse, bind_port


def test_port_held_by_another_program_is_refused_by_name() -> None:
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    try:
        with pytest.raises(PortInUse, match=f"port {port} is already in use by another program"):
            bind_port("127.0.0.1", port, backlog=8)
    finally:
        other.close()
    # Refused without leaving a claim behind: the port can be taken once it is free.
    bind_port("127.0.0.1", port, backlog=8).close()


def test_second_server_is_refused_naming_the_first_pid_and_may_follow_it() -> None:
    async def scenario() -> tuple[str, int]:
        first = bind_port("127.0.0.1", 0, backlog=8)
        assert first.guard is not None
        first.guard.serve()
        port = first.port
        try:
            # The would-be second server asks from another thread: the holder answers from
            # this loop.
            with pytest.raises(PortInUse) as refused:
                await asyncio.to_thread(bind_port, "127.0.0.1", port, 8)
        finally:
            first.close()
        after = await asyncio.to_thread(bind_port, "127.0.0.1", port, 8)
        after.close()
        return str(refused.value), port

    message, port = uvloop.run(scenario())
    assert message == f"port {port} is already served by streamgate pid {os.getpid()}"


def test_members_of_one_deployment_share_a_port_and_no_one_else_does() -> None:
    async def scenario() -> None:
        first = bind_port("127.0.0.1", 0, backlog=8, deployment="blue")
        assert first.guard is not None
        first.guard.serve()
        try:
            worker = await asyncio.to_thread(bind_port, "127.0.0.1", first.port, 8, "blue")
            assert worker.guard is None  # a member joins; the first keeps the claim
            assert worker.port == first.port
            worker.close()
            for stranger in ("green", None):
                with pytest.raises(PortInUse, match="already served by streamgate pid"):
                    await asyncio.to_thread(bind_port, "127.0.0.1", first.port, 8, stranger)
        finally:
            first.close()

    uvloop.run(scenario())
