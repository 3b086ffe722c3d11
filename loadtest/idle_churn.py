"""Idle-session churn: does the server's RSS come back after waves of idle sessions end?

    python -m loadtest.idle_churn --url ws://127.0.0.1:8765 --pid $(pgrep -f 'streamgate serve') \
        --key "$(cat .streamgate/dev-api-key)" --sessions 500 --waves 12

Each wave opens `--sessions` ASR sessions to `ready`, sends nothing, and waits until the server
has closed every one of them (its `idle_timeout_s`) or, with `--close`, closes them itself. After
each wave it waits `--settle` seconds and prints the server's RSS (read from /proc, so the server
must run on this machine). docs/benchmarks.md ("Idle sessions and RSS") has a run and what it means.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _open(url: str, key: str | None) -> ClientConnection:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    ws = await connect(f"{url}/v1/asr/stream", additional_headers=headers, open_timeout=60,
                       ping_interval=None)
    await ws.recv()  # ready
    return ws


async def _until_closed(ws: ClientConnection, close: bool) -> None:
    if close:
        await ws.close()
        return
    try:
        while True:
            await ws.recv()
    except ConnectionClosed:
        return


async def wave(url: str, key: str | None, sessions: int, close: bool) -> None:
    opened = [await _open(url, key) for _ in range(sessions)]
    await asyncio.gather(*(_until_closed(ws, close) for ws in opened))


async def run(args: argparse.Namespace) -> int:
    start = rss_kib(args.pid)
    print(f"start: RSS {start / 1024:.1f} MiB", flush=True)
    for n in range(args.waves):
        await wave(args.url, args.key, args.sessions, args.close)
        await asyncio.sleep(args.settle)
        now = rss_kib(args.pid)
        print(f"after wave {n + 1}: RSS {now / 1024:.1f} MiB "
              f"(+{(now - start) / 1024:.1f} MiB, {(now - start) / args.sessions:.1f} KiB "
              "per session of one wave)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.idle_churn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="ws://127.0.0.1:8765", help="the server's WebSocket base URL")
    p.add_argument("--pid", type=int, required=True, help="the server's process id (for RSS)")
    p.add_argument("--key", help="API key (omit when the server allows anonymous sessions)")
    p.add_argument("--sessions", type=int, default=500, help="idle sessions per wave")
    p.add_argument("--waves", type=int, default=12, help="number of waves")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait after a wave")
    p.add_argument("--close", action="store_true",
                   help="close the sessions from the client instead of waiting for idle_timeout")
    return asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
