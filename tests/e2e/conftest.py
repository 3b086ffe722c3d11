"""End-to-end fixtures: a real `streamgate serve` process on loopback, real sockets, real audio."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.speech import espeak_pcm16, silence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TEST_KEY = "test-key"
__all__ = ["TEST_KEY", "ServerProcess", "espeak_pcm16", "silence", "start_server"]


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    ws_port: int
    http_port: int
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def logs(self) -> list[dict[str, object]]:
        out = []
        for line in list(self.stderr_lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            tail = "\n".join(self.stderr_lines[-40:])
            raise AssertionError(f"server did not stop within {timeout} s:\n{tail}") from None


def start_server(extra_env: dict[str, str] | None = None, *, workers: int = 1) -> ServerProcess:
    """`streamgate serve` on free ports; `workers` > 1 starts a supervisor and its workers
    (tests/e2e/test_workers.py), 1 the single process every other test talks to."""
    env = {
        **os.environ,
        "STREAMGATE_SERVER__WS_PORT": "0",
        "STREAMGATE_SERVER__HTTP_PORT": "0",
        "STREAMGATE_STRICT_TASKS": "1",
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--config", str(HERE / "server.toml"),
         "--workers", str(workers)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stderr_lines: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_lines.append(line.rstrip("\n"))

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    line = proc.stdout.readline()
    if not line:
        code = proc.wait(10)
        pumper.join(5)  # the process is gone: collect what it said before failing
        raise RuntimeError(f"server did not start (exit {code}):\n" + "\n".join(stderr_lines[-30:]))
    info = json.loads(line)
    return ServerProcess(proc, info["ws_port"], info["http_port"], stderr_lines)


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    srv = start_server()
    yield srv
    code = srv.stop()
    # Exit code 3 means the server found leaked asyncio tasks at shutdown.
    tail = "\n".join(srv.stderr_lines[-40:])
    assert code == 0, f"server exited with {code}:\n{tail}"


@pytest.fixture(scope="session")
def speech() -> bytes:
    """About 2 s of speech at 16 kHz, padded with silence on both sides."""
    return silence(500) + espeak_pcm16("hello world, this is a streaming test") + silence(1200)


def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
