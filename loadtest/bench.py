"""The one-command benchmark: `python -m loadtest.bench` (`make bench`).

One command, one process tree, one run. Each server runs alone, started fresh, pinned to one
CPU (0 by default); the load generator runs in this process, pinned to another CPU (1). The
exception is the supervised node of part 4, which shares both CPUs with the generator:

  ws-echo     websockets' asyncio server (uvloop), a text ack per binary frame
  raw-echo    asyncio.Protocol + websockets' sans-I/O ServerProtocol (uvloop), ack inline in
              data_received: the ceiling for this design on one core
  streamgate  `python -m server serve`: the full ASR ingest path (mu-law decode, webrtcvad,
              utterances, speech resampled 8k->16k, synthetic engine), with billing on:
              embedded Redis and PostgreSQL started by the server in a temporary directory, a
              tenant made through the admin API (loadtest/bench_tenant.py), every session
              keyed, admitted, leased and metered. Acked by `credit` (window of 4 frames:
              credit for every frame).

What runs, in order (each server process fresh):

  1. ws-echo, raw-echo, streamgate: closed loop, --connections connections, two shapes one
     after the other on the same server: "ack per frame" (one frame in flight) and "window"
     (--window frames in flight, within the credit; the headline). frames/s, latency, CPU, RSS.
  2. streamgate: --idle-sessions sessions opened to `ready`, no audio: RSS per idle session;
     then TTS time to first audio through the gateway vs the engine alone
     (loadtest/tts_probe.py), 1 and 20 concurrent sessions.
  3. real time (loadtest/capacity.py): the most sessions, each sending a frame every 20 ms,
     with p99 frame-to-credit < 20 ms; first a fresh raw-echo (`echo-realtime`: the ceiling
     of this design on this machine), then streamgate (`realtime`, RSS and CPU per session).
  4. `--workers 2` beside `--workers 1` (`workers`, loadtest/workers_compare.py): the same
     --workers-sessions real-time sessions for the same --workers-seconds against a fresh
     `serve --workers 1` (pinned, as above; then also at half the sessions, the load each of
     two workers carries) and a fresh `serve --workers 2` (the supervisor, both workers, the
     stores and the generator unpinned on both CPUs). From /proc: each worker's CPU, the
     supervisor's CPU and RSS, the stores', the generator's and everything else's on the CPUs;
     CPU per session-second and the efficiency of two workers against one.

The summary (targets met or not, tables, ratios) is printed and written to docs/benchmarks.md
(unless --no-write, --only, or a run failed); the servers' stderr is kept in
loadtest/reports/last-run/ (git-ignored). Cleanup: servers get SIGTERM (streamgate then drains
and stops its Redis and PostgreSQL) and SIGKILL after a timeout; any child of a server still
running after it exited (an orphaned redis-server or postgres) is killed and reported. Servers
die with the bench if it is killed (PR_SET_PDEATHSIG, see loadtest/pin.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from loadtest import call_floor
from loadtest.bench_report import (
    CLOSED_LOOP_NAMES,
    P99_LIMIT_MS,
    REALTIME_CEILING,
    WORKERS_RUN,
    ServerRun,
    analyse_stderr,
    format_node_run,
    observation_lines,
    render_markdown,
    result_sections,
)
from loadtest.bench_tenant import Admin
from loadtest.capacity import CapacitySearch
from loadtest.loadgen import (
    SIGNALS,
    AckMode,
    ProbeSample,
    Target,
    format_result,
    run_closed_loop,
    run_idle,
)
from loadtest.node_probe import NodeProbe
from loadtest.pin import raise_nofile_limit
from loadtest.procfs import cpu_seconds, cpu_stat, descendants, proc_stat
from loadtest.tts_probe import measure_ttfa
from loadtest.twilio_calls import (
    MAX_LAG_P99_MS,
    PEER_MAX_LAG_P99_MS,
    TWILIO_PATH,
    CallSearch,
    ServerCounters,
    streamgate_counters,
)
from loadtest.workers_compare import measure_node
from server.config import SyntheticTtsConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS_PATH = ROOT / "docs" / "benchmarks.md"
LOGS_DIR = ROOT / "loadtest" / "reports" / "last-run"  # servers' stderr (git-ignored)
HOST = "127.0.0.1"
ASR_PATH = (
    "/v1/asr/stream?model=synthetic&encoding=mulaw&sample_rate=8000&vad=medium"
    "&interim_results=false"
)
TTS_PATH = "/v1/tts/stream?model=synthetic&encoding=pcm_s16le&sample_rate=16000"
PHASES = ("telephony", "pipecat", "ws-echo", "raw-echo", "streamgate", "idle", "tts", "realtime",
          "echo-realtime", "workers")
# Issue 15: Twilio calls per core on streamgate, and on Pipecat (the peer) with the same calls.
TELEPHONY_RUN = "streamgate-telephony"
PEER_RUN = "pipecat-telephony"
PEER_VENV = Path(os.environ.get("STREAMGATE_BENCH_PIPECAT_VENV", ROOT / ".venv-bench-pipecat"))
PEER_SETUP = "loadtest/pipecat_peer/setup.sh"
ECHO_START_TIMEOUT_S = 30.0
STREAMGATE_START_TIMEOUT_S = 150.0  # initdb of a fresh PostgreSQL cluster, migrations
STOP_TIMEOUT_S = 30.0  # streamgate drains (5 s), flushes billing, stops Redis and PostgreSQL
IDLE_SETTLE_S = 2.0
TTS_LEVELS = ((1, 100), (20, 10))  # (concurrent sessions, measured requests per session)
# --quick: every part for a few seconds (the smoke test); the numbers mean nothing.
QUICK = {"connections": 40, "seconds": 1.0, "warmup": 0.5, "idle_sessions": 40, "rt_step": 20,
         "rt_resolution": 20, "rt_max": 40, "rt_ramp": 0.5, "rt_warmup": 0.5, "rt_seconds": 1.0,
         "rt_budget": 15.0, "tts_levels": ((1, 4), (4, 2)), "quiet_wait": 0.0,
         "workers_sessions": 20, "workers_seconds": 1.0, "calls_step": 5, "calls_resolution": 5,
         "calls_max": 5, "peer_step": 3, "peer_resolution": 3, "peer_max": 3, "calls_ramp": 0.5,
         "calls_warmup": 0.5, "calls_seconds": 1.0, "calls_budget": 20.0}
TTS_FIRST_AUDIO_MS = 50.0
# --workers 2 beside --workers 1: about half of what one pinned worker holds at p99 < 20 ms
# (350 sessions, docs/benchmarks.md): well below saturation for both (13H1).
WORKERS_SESSIONS = 200
WORKERS_SECONDS = 15.0

# ingest_queue_ms = 80 -> a credit window of 640 bytes of 8 kHz mu-law = 4 frames; credit is
# returned once a quarter window (160 bytes, one 20 ms frame) has drained: one credit per frame.
STREAMGATE_TOML = """\
# Written by loadtest/bench.py for one run; layered over config/default.toml.
[server]
host = "127.0.0.1"
ws_port = 0
http_port = 0
idle_timeout_s = 60
drain_timeout_s = 5.0
drain_notice_s = 0.0  # no load balancer to tell: a stop after the sessions ended is at once
max_connections = {max_connections}

[logging]
level = "WARNING"

[auth]
allow_anonymous = false

[billing]
# On, with embedded Redis + PostgreSQL in this run's temporary directory (never .streamgate/).
enabled = true
data_dir = "{data_dir}"
embedded_redis_port = 0
embedded_postgres_port = 0
admin_token = "{admin_token}"
dev_tenant = false  # its default limits (100 sessions...) would cap the bench: see bench_tenant

[asr.session]
default_model = "synthetic"
ingest_queue_ms = 80

[asr.models.synthetic]
engine = "synthetic"
latency_base_ms = 5.0
latency_per_item_ms = 0.5
max_batch = 32
max_wait_ms = 5.0

[tts.session]
default_model = "synthetic"

[tts.models.synthetic]
engine = "synthetic"
first_audio_ms = {first_audio_ms}
rtf = 0.05
chunk_ms = 40
sample_rate = 16000
"""


# The telephony server: the same, but the ASR engine's batch capacity made effectively unlimited
# (the default synthetic engine models a GPU of ~1,500 feeds/s, which a few hundred calls
# saturate: its queue would drop caller audio, and the bench would measure the engine, not the
# gateway), and the default ingest queue (a call grants no credit: the queue is what absorbs a
# late read before audio is dropped).
TELEPHONY_ENGINE = """\
[asr.models.synthetic]
engine = "synthetic"
latency_base_ms = 5.0
latency_per_item_ms = 0.0
max_batch = 4096
max_wait_ms = 5.0
max_pending = 65536
"""


def telephony_toml(template: str) -> str:
    start = template.index("[asr.models.synthetic]")
    end = template.index("[tts.session]")
    out = template[:start] + TELEPHONY_ENGINE + "\n" + template[end:]
    return out.replace("ingest_queue_ms = 80\n", "")


# --- server processes ----------------------------------------------------------------------------


class ServerProcess:
    """A server child pinned to one CPU; implements loadgen.ServerProbe from /proc."""

    live: set[ServerProcess] = set()  # every started server, for cleanup

    def __init__(
        self, name: str, argv: list[str], cpu: int | None, workdir: Path,
        gen_cpu: int | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.cpu = cpu
        self.gen_cpu = gen_cpu
        self.stderr_path = workdir / f"{name}.stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.returncode: int | None = None
        self.strays: list[str] = []  # children still running after the server exited (killed)
        self._clk_tck = os.sysconf("SC_CLK_TCK")
        self._helpers: dict[int, str] = {}  # children seen (pid -> start time)

    async def start(self, timeout_s: float) -> dict[str, Any]:
        """Spawn and wait for the `{"event":"listening",...}` line on stdout."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("STREAMGATE_") and k not in ("REDIS_URL", "DATABASE_URL")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.name.startswith("streamgate"):
            env["STREAMGATE_STRICT_TASKS"] = "1"  # exit code 3 if tasks leak at shutdown
        self._spawn(env)
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([out], [], [], 0)
            if not ready:
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
                continue
            line = out.readline()
            if not line:
                break
            with contextlib.suppress(ValueError):
                info = json.loads(line)
                if isinstance(info, dict) and info.get("event") == "listening":
                    self.info = info
                    return info
        exited = self.proc.poll() is not None
        await self.stop()
        last = (self.stderr_tail(1) or "no stderr").strip()
        raise RuntimeError(
            f"{self.name} exited with code {self.returncode} while starting: {last}" if exited
            else f"{self.name} did not start within {timeout_s:g} s (stopped); stderr: {last}"
        )

    def _spawn(self, env: dict[str, str]) -> None:
        cmd = [sys.executable, "-m", "loadtest.pin", "" if self.cpu is None else str(self.cpu),
               "--", *self.argv]
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=err, start_new_session=True,  # Ctrl-C reaches the bench only
            )
        ServerProcess.live.add(self)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def helpers_cpu_s(self) -> float:
        """CPU seconds of the server's children (embedded Redis, PostgreSQL and its backends,
        pocketsphinx workers); remembers them for the stray check at stop()."""
        kids = descendants(self.pid)
        self._helpers.update(kids)
        return sum(sum(cpu_seconds(pid, self._clk_tck)) for pid in kids)

    def sample(self) -> ProbeSample:
        user, system = cpu_seconds(self.pid, self._clk_tck)
        reads = writes = sleeps = 0
        with contextlib.suppress(OSError, KeyError, ValueError):
            with open(f"/proc/{self.pid}/io") as fh:
                io = dict(line.split(":", 1) for line in fh if ":" in line)
            reads, writes = int(io["syscr"]), int(io["syscw"])
            with open(f"/proc/{self.pid}/status") as fh:
                for line in fh:
                    if line.startswith("voluntary_ctxt_switches:"):
                        sleeps = int(line.split()[1])
        busy, steal, gen_busy = 0.0, 0.0, 0.0
        if self.cpu is not None and self.gen_cpu is not None:
            stat = cpu_stat()
            busy, steal = stat.get(self.cpu, (0.0, 0.0))
            gen_busy = stat.get(self.gen_cpu, (0.0, 0.0))[0]
        return ProbeSample(user, system, reads, writes, sleeps, busy, steal, gen_busy,
                           self.helpers_cpu_s())

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to timeout_s, then SIGKILL; then kill any orphaned child."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.helpers_cpu_s()  # note the children before they are reparented
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            for _ in range(int(timeout_s / 0.05)):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
        self.stop_now()
        return self.returncode

    def stop_now(self, timeout_s: float = 5.0) -> None:
        """Synchronous cleanup path (errors, Ctrl-C): SIGTERM, short wait, SIGKILL."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                self.helpers_cpu_s()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self.returncode = proc.returncode
        self._kill_strays()
        ServerProcess.live.discard(self)

    def _kill_strays(self, grace_s: float = 3.0) -> None:
        """Children that outlived the server (it was killed, or its shutdown failed) would
        keep running with no one to stop them: kill them and say so."""
        deadline = time.monotonic() + grace_s
        while True:
            left = {pid: start for pid, start in self._helpers.items()
                    if (f := proc_stat(pid)) is not None and f[19] == start and f[0] != "Z"}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for pid in left:
            with contextlib.suppress(OSError):
                self.strays.append(Path(f"/proc/{pid}/cmdline").read_bytes()
                                   .replace(b"\0", b" ").decode(errors="replace").strip()[:80])
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._helpers.clear()


async def wait_for_quiet(cpus: list[int], max_wait_s: float, busy_pct: float = 10.0) -> str:
    """Wait (at most max_wait_s) until other processes leave the pinned CPUs alone for 1 s."""
    waited = 0.0
    worst = 0.0
    while True:
        before = cpu_stat()
        await asyncio.sleep(1.0)
        after = cpu_stat()
        worst = max(100.0 * (after.get(c, (0.0, 0.0))[0] - before.get(c, (0.0, 0.0))[0])
                    for c in cpus)
        if worst < busy_pct:
            return ""
        waited += 1.0
        if waited >= max_wait_s:
            return f"pinned CPUs still {worst:.0f}% busy with other processes after " \
                   f"waiting {max_wait_s:g} s; running anyway"
        if waited == 1.0:
            print(f"bench: pinned CPUs {worst:.0f}% busy with other processes; waiting up to "
                  f"{max_wait_s:g} s for quiet", flush=True)


def stop_all_servers() -> None:
    for server in list(ServerProcess.live):
        server.stop_now()


async def http_get(port: int, path: str, timeout_s: float = 5.0) -> str:
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
                         .encode())
            data = await reader.read()
        finally:
            writer.close()
    return data.decode(errors="replace")


_METRIC_RE = re.compile(r"^(streamgate_[a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$")
_WANTED = (
    "streamgate_sessions_total",
    "streamgate_upgrades_rejected_total",
    "streamgate_engine_errors_total",
    "streamgate_engine_batch_size_count",
    "streamgate_engine_batch_size_sum",
    "streamgate_frames_in_total",
    "streamgate_audio_dropped_ms_total",
)


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_RE.match(line.strip())
        if match and match.group(1) in _WANTED:
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


# --- one server, one run -------------------------------------------------------------------------


@dataclass
class LiveServer:
    """A started server and how to reach it."""

    process: ServerProcess
    ws_port: int
    config_path: Path | None = None  # streamgate
    admin: Admin | None = None  # streamgate: its admin API
    api_key: str | None = None  # streamgate: the bench tenant's key

    def target(self, path: str, ack: AckMode) -> Target:
        return Target(HOST, self.ws_port, path, ack, self.api_key)


Measure = Callable[[LiveServer, ServerRun], Awaitable[None]]
T = TypeVar("T")


def write_config(workdir: Path, name: str, args: argparse.Namespace) -> tuple[Path, str]:
    """This server's config (its own billing data directory) and admin token."""
    token = secrets.token_urlsafe(24)
    path = workdir / f"{name}.toml"
    template = telephony_toml(STREAMGATE_TOML) if name == TELEPHONY_RUN else STREAMGATE_TOML
    path.write_text(template.format(
        max_connections=max(10000, args.connections + 100, args.idle_sessions + 100,
                            args.rt_max + 100, args.calls_max + 100),
        data_dir=workdir / f"{name}-data", admin_token=token,
        first_audio_ms=TTS_FIRST_AUDIO_MS))
    path.chmod(0o600)  # holds the admin token
    return path, token


def server_argv(name: str, config_path: Path | None, workers: int = 1) -> list[str]:
    if name == PEER_RUN:
        # Pipecat logs its banner at import, before the server can lower its level.
        return ["env", "LOGURU_LEVEL=WARNING", str(PEER_VENV / "bin" / "python"), "-m",
                "loadtest.pipecat_peer.server", "--host", HOST, "--port", "0"]
    if config_path is not None:
        # One process unless asked (`--workers` defaults to one worker per core, under a
        # supervisor): the bench pins it to one core. With N > 1 the started process execs
        # the supervisor in place, so its pid is the supervisor's.
        return [sys.executable, "-m", "server", "serve", "--config", str(config_path),
                "--host", HOST, "--ws-port", "0", "--http-port", "0", "--workers", str(workers)]
    return [sys.executable, "-m", "loadtest.echo_servers", name, "--host", HOST, "--port", "0"]


async def with_server(name: str, args: argparse.Namespace, workdir: Path,
                      measure: Measure, workers: int = 1) -> ServerRun:
    """Start one server (streamgate: with its bench tenant), measure, stop, check its health.
    A node of several workers is not pinned: it and the generator share the bench's CPUs."""
    run = ServerRun(name)
    streamgate = name.startswith("streamgate")
    config, token = write_config(workdir, name, args) if streamgate else (None, "")
    kind = ("streamgate" if streamgate else "raw-echo" if name == REALTIME_CEILING
            else PEER_RUN if name == PEER_RUN else name)
    pinned = args.pinned and workers == 1
    server = ServerProcess(name, server_argv(kind, config, workers),
                           args.server_cpu if pinned else None, workdir,
                           args.client_cpu if pinned else None)
    with shared_cpus(args, not pinned):
        return await _with_server(server, run, config, token, args, measure)


@contextlib.contextmanager
def shared_cpus(args: argparse.Namespace, share: bool) -> Iterator[None]:
    """While a node runs unpinned, the generator (this process) may run on both of the bench's
    CPUs too, and so may the node (its processes inherit this mask)."""
    if not (share and args.pinned):
        yield
        return
    os.sched_setaffinity(0, {args.server_cpu, args.client_cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, {args.client_cpu})


async def _with_server(server: ServerProcess, run: ServerRun, config: Path | None, token: str,
                       args: argparse.Namespace, measure: Measure) -> ServerRun:
    if args.pinned and args.quiet_wait > 0:
        warning = await wait_for_quiet([args.server_cpu, args.client_cpu], args.quiet_wait)
        if warning:
            print(f"bench: {warning}", flush=True)
    http_port: int | None = None
    try:
        live = await start_server(server, config, token, args)
        http_port = live.admin.http_port if live.admin else None
        before = await live.admin.balance() if live.admin else None
        await measure(live, run)
        if live.admin and before is not None:
            await asyncio.sleep(1.0)  # the usage of the last sessions reaches the wallet
            run.balances = (before, await live.admin.balance())
    except Exception as exc:
        run.errors.append(f"{type(exc).__name__}: {exc}")
    await stop_server(server, run, http_port)
    return run


async def start_server(server: ServerProcess, config: Path | None, token: str,
                       args: argparse.Namespace) -> LiveServer:
    """Start it; streamgate (a config) also gets its bench tenant and key."""
    started = time.monotonic()
    info = await server.start(ECHO_START_TIMEOUT_S if config is None
                              else STREAMGATE_START_TIMEOUT_S)
    live = LiveServer(server, int(info["ws_port"]), config)
    if config is not None:
        live.admin = Admin(int(info["http_port"]), token, HOST)
        live.api_key = await live.admin.create_bench_tenant()
    print(f"bench: {server.name} pid {server.pid}"
          + (f" on CPU {server.cpu}" if server.cpu is not None else "")
          + f", ready in {time.monotonic() - started:.1f} s"
          + (" (billing on: embedded Redis + PostgreSQL, bench tenant funded)"
             if live.admin else ""), flush=True)
    await asyncio.sleep(1.0 if live.admin else 0.5)  # start-up settles before RSS idle
    return live


async def stop_server(server: ServerProcess, run: ServerRun, http_port: int | None) -> None:
    """Metrics while it runs, then stop it; its exit code, logs and leftovers into run."""
    await asyncio.sleep(0.5)  # sessions settle after the close handshakes
    alive = server.alive()
    metrics: dict[str, float] = {}
    if http_port and alive:
        try:
            metrics = parse_metrics(await http_get(http_port, "/metrics"))
        except (OSError, TimeoutError) as exc:
            run.errors.append(f"/metrics failed: {exc}")
    exit_code = await server.stop()
    if server.strays:
        run.errors.append(f"still running after the server exited (killed): {server.strays}")
    run.health = analyse_stderr(server.stderr_path, json_logs=run.name.startswith("streamgate"))
    run.health.alive_after_close, run.health.exit_code = alive, exit_code
    run.health.metrics = metrics


async def phase(run: ServerRun, what: str, work: Awaitable[T], timeout_s: float) -> T | None:
    """One measurement; an error is recorded in the run, and the run goes on."""
    print(f"bench: {run.name}: {what} ...", flush=True)
    try:
        async with asyncio.timeout(timeout_s):
            return await work
    except Exception as exc:
        run.errors.append(f"{what}: {type(exc).__name__}: {exc}")
        print(f"bench: {run.name}: {what} FAILED: {type(exc).__name__}: {exc}", flush=True)
        return None


def connect_budget(args: argparse.Namespace, sessions: int) -> float:
    """Generous: at most 20 s per batch of handshakes, plus closing."""
    return 60.0 + 20.0 * sessions / max(1, int(args.batch))


async def measure_closed_loops(live: LiveServer, run: ServerRun,
                               args: argparse.Namespace) -> None:
    streamgate = live.api_key is not None
    target = live.target(ASR_PATH if streamgate else "/", "credit" if streamgate else "echo")
    budget = args.warmup + args.seconds + connect_budget(args, args.connections)
    for inflight in (1, args.window):
        label = "ack per frame" if inflight == 1 else f"window of {inflight} frames"
        result = await phase(run, f"{label}, {args.connections} connections", run_closed_loop(
            target, connections=args.connections, warmup_s=args.warmup, seconds=args.seconds,
            batch=args.batch, probe=live.process, signal=args.signal, inflight=inflight),
            budget)
        if result is not None:
            print(f"bench: {run.name}: {format_result(result)}", flush=True)
        if inflight == 1:
            run.ack = result
        else:
            run.window = result
        await asyncio.sleep(1.0)  # the closed sessions settle (streamgate: usage, leases)


async def measure_idle_and_tts(live: LiveServer, run: ServerRun,
                               args: argparse.Namespace) -> None:
    if "idle" in args.phases:
        run.idle = await phase(run, f"{args.idle_sessions} idle sessions", run_idle(
            live.target(ASR_PATH, "credit"), sessions=args.idle_sessions,
            settle_s=IDLE_SETTLE_S, probe=live.process, batch=args.batch),
            connect_budget(args, args.idle_sessions))
        if run.idle is not None:
            print(f"bench: {run.name}: {run.idle.kib_per_session:.1f} KiB per idle session",
                  flush=True)
        await asyncio.sleep(1.0)
    if "tts" not in args.phases:
        return
    engine, frame_ms = args.tts_settings
    for concurrency, per_session in args.tts_levels:
        t = await phase(run, f"TTS time to first audio, {concurrency} session(s)", measure_ttfa(
            live.target(TTS_PATH, "credit"), engine, concurrency=concurrency,
            per_session=per_session, frame_ms=frame_ms), 120.0)
        if t is not None:
            run.tts.append(t)
            print(f"bench: {run.name}: TTS x{concurrency}: gateway p50/p99 "
                  f"{t.gateway.p50_ms:.1f}/{t.gateway.p99_ms:.1f} ms, engine "
                  f"{t.engine.p50_ms:.1f}/{t.engine.p99_ms:.1f} ms", flush=True)


async def measure_capacity(live: LiveServer, run: ServerRun, args: argparse.Namespace) -> None:
    # raw-echo's real-time capacity is the ceiling: the same sessions against a server that
    # does nothing but parse frames and acknowledge each one (as if the window were 4 frames).
    streamgate = live.api_key is not None
    target = live.target(ASR_PATH, "credit") if streamgate else live.target("/", "echo")
    search = CapacitySearch(
        target, live.process, signal=args.signal, batch=args.batch,
        warmup_s=args.rt_warmup, seconds=args.rt_seconds, ramp_s=args.rt_ramp,
        p99_limit_ms=P99_LIMIT_MS)
    fixed = args.realtime_sessions
    run.capacity = await phase(
        run, "real-time capacity search" if not fixed else f"{fixed} real-time sessions",
        search.run(step=args.rt_step, resolution=fixed or args.rt_resolution,
                   max_sessions=fixed or args.rt_max, budget_s=args.rt_budget,
                   first=fixed or None),
        args.rt_budget + connect_budget(args, fixed or args.rt_max))


async def measure_workers(live: LiveServer, run: ServerRun, args: argparse.Namespace,
                          workers: int) -> None:
    """The same real-time sessions as every other node of the comparison (issue 13)."""
    cpus = ({args.server_cpu, args.client_cpu} if args.pinned
            else set(os.sched_getaffinity(0)))
    probe = NodeProbe(live.process.pid, supervised=workers > 1, cpus=cpus)
    search = CapacitySearch(
        live.target(ASR_PATH, "credit"), probe, signal=args.signal, batch=args.batch,
        warmup_s=args.rt_warmup, seconds=args.workers_seconds, ramp_s=args.rt_ramp,
        p99_limit_ms=P99_LIMIT_MS)
    http_port = live.admin.http_port if live.admin else None

    async def scrape() -> str:
        assert http_port is not None
        return await http_get(http_port, "/metrics")

    n = args.workers_sessions
    # One worker also at n/2: the load each of two workers carries (13H1).
    counts = [n, n // 2] if workers == 1 and n >= 2 else [n]
    found = await phase(
        run, f"{' then '.join(map(str, counts))} real-time sessions, --workers {workers}",
        measure_node(search, probe, workers, counts, scrape if http_port else None),
        len(counts) * (args.rt_ramp + args.rt_warmup + args.workers_seconds + 10.0) + 20.0
        + connect_budget(args, n))
    for node in found or []:
        run.nodes.append(node)
        print(f"bench: {run.name}: {format_node_run(node)}", flush=True)


async def measure_calls(live: LiveServer, run: ServerRun, args: argparse.Namespace) -> None:
    """Issue 15: the most Twilio calls the server keeps up with (loadtest/twilio_calls.py)."""
    peer = run.name == PEER_RUN
    target = Target(HOST, live.ws_port, TWILIO_PATH, "credit")  # a provider sends no header

    async def streamgate_view() -> ServerCounters:
        assert live.admin is not None
        return streamgate_counters(await http_get(live.admin.http_port, "/metrics"))

    async def peer_view() -> ServerCounters:
        return peer_counters(await http_get(live.ws_port, "/stats"))

    search = CallSearch(
        "pipecat" if peer else "streamgate", target, live.api_key, live.process,
        peer_view if peer else streamgate_view,
        lag_limit_ms=PEER_MAX_LAG_P99_MS if peer else MAX_LAG_P99_MS,
        lag_what=("audio frame read (its `media` decoded) -> its STT stage" if peer
                  else "frame read -> through VAD (`streamgate_ingest_lag_seconds`)"),
        warmup_s=args.calls_warmup, seconds=args.calls_seconds, ramp_s=args.calls_ramp,
        batch=args.batch)
    step, resolution, most, fixed = ((args.peer_step, args.peer_resolution, args.peer_max,
                                      args.peer_calls) if peer else
                                     (args.calls_step, args.calls_resolution, args.calls_max,
                                      args.calls))
    run.calls = await phase(
        run, f"{fixed} Twilio calls" if fixed else "Twilio calls per core search",
        search.run(step=step, resolution=fixed or resolution, max_calls=fixed or most,
                   budget_s=args.calls_budget, first=fixed or None),
        args.calls_budget + connect_budget(args, fixed or most))


def peer_counters(response: str) -> ServerCounters:
    """The Pipecat peer's /stats (loadtest/pipecat_peer/server.py): audio that reached its STT
    stage and the lag histogram. It has no overflow: nothing is ever dropped, only late."""
    body = json.loads(response.split("\r\n\r\n", 1)[1])
    buckets = {float(k): float(v) for k, v in body["lag_buckets"].items()}
    return ServerCounters(float(body["audio_ms"]), 0.0, buckets)


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=1000, help="closed loops")
    p.add_argument("--seconds", type=float, default=10.0, help="closed loops: measured window")
    p.add_argument("--warmup", type=float, default=3.0, help="closed loops")
    p.add_argument("--window", type=int, default=4, choices=(2, 3, 4),
                   help="frames in flight in the window shape (streamgate's credit window is "
                        "4 frames)")
    p.add_argument("--idle-sessions", type=int, default=1000)
    p.add_argument("--rt-step", type=int, default=200, help="real time: sessions per step")
    p.add_argument("--rt-resolution", type=int, default=50,
                   help="real time: bisection stops at this many sessions")
    p.add_argument("--rt-max", type=int, default=3000, help="real time: most sessions tried")
    p.add_argument("--rt-ramp", type=float, default=5.0,
                   help="real time: a step's new sessions connect evenly over this long")
    p.add_argument("--rt-warmup", type=float, default=2.0, help="real time: per step")
    p.add_argument("--rt-seconds", type=float, default=5.0, help="real time: per step")
    p.add_argument("--rt-budget", type=float, default=120.0,
                   help="real time: the search stops before a step would end after this")
    p.add_argument("--realtime-sessions", type=int, default=0, metavar="N",
                   help="real time: measure N sessions only, no search")
    p.add_argument("--workers-sessions", type=int, default=WORKERS_SESSIONS, metavar="N",
                   help="--workers 2 beside --workers 1: real-time sessions against each "
                        "(docs/decisions/13H1-workers-bench.md says why this many)")
    p.add_argument("--workers-seconds", type=float, default=WORKERS_SECONDS, metavar="S",
                   help="--workers 2 beside --workers 1: the measured window")
    p.add_argument("--calls-step", type=int, default=200,
                   help="Twilio calls (issue 15): streamgate's search grows by this many calls")
    p.add_argument("--calls-resolution", type=int, default=50,
                   help="Twilio calls: streamgate's bisection stops at this many calls")
    p.add_argument("--calls-max", type=int, default=3000, help="Twilio calls: most tried")
    p.add_argument("--calls", type=int, default=0, metavar="N",
                   help="Twilio calls: measure N streamgate calls only, no search")
    p.add_argument("--peer-step", type=int, default=15,
                   help="Twilio calls: Pipecat's search grows by this many calls")
    p.add_argument("--peer-resolution", type=int, default=5,
                   help="Twilio calls: Pipecat's bisection stops at this many calls")
    p.add_argument("--peer-max", type=int, default=600, help="Twilio calls: most tried on Pipecat")
    p.add_argument("--peer-calls", type=int, default=0, metavar="N",
                   help="Twilio calls: measure N Pipecat calls only, no search")
    p.add_argument("--calls-ramp", type=float, default=5.0,
                   help="Twilio calls: a step's new calls connect evenly over this long")
    p.add_argument("--calls-warmup", type=float, default=3.0, help="Twilio calls: per step")
    p.add_argument("--calls-seconds", type=float, default=10.0,
                   help="Twilio calls: measured window per step (a multiple of the 5 s usage "
                        "interval: streamgate publishes accepted audio with each usage report)")
    p.add_argument("--calls-budget", type=float, default=200.0,
                   help="Twilio calls: each search stops before a step would end after this")
    p.add_argument("--only", action="append", choices=PHASES,
                   help="run only this part (repeatable); docs/benchmarks.md is not written")
    p.add_argument("--skip", action="append", choices=PHASES, default=[],
                   help="leave this part out (repeatable); docs/benchmarks.md is not written")
    p.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument("--quick", action="store_true",
                   help="every part for a few seconds with a few sessions (a smoke test: the "
                        "numbers mean nothing; docs/benchmarks.md is not written)")
    p.add_argument("--logs-dir", type=Path, default=LOGS_DIR,
                   help="where the servers' stderr is kept (default: %(default)s)")
    p.add_argument("--batch", type=int, default=100, help="connections opened at a time")
    p.add_argument("--signal", choices=SIGNALS, default="speech",
                   help="audio sent: speech-like loop (default) or a stationary 300 Hz tone")
    p.add_argument("--quiet-wait", type=float, default=20.0, metavar="S",
                   help="before each server, wait up to S s for the pinned CPUs to be idle "
                        "(other processes < 10%%); 0 = do not wait")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    args = p.parse_args(argv)
    if (min(args.connections, args.batch, args.idle_sessions, args.rt_step, args.rt_resolution,
            args.rt_max, args.workers_sessions) < 1 or args.seconds <= 0
            or args.workers_seconds <= 0 or args.warmup < 0 or args.rt_seconds <= 0
            or args.rt_warmup < 0 or args.rt_ramp < 0 or args.realtime_sessions < 0
            or min(args.calls_step, args.calls_resolution, args.calls_max, args.peer_step,
                   args.peer_resolution, args.peer_max) < 1 or args.calls_seconds <= 0
            or args.calls_warmup < 0 or args.calls_ramp < 0 or min(args.calls,
                                                                    args.peer_calls) < 0):
        p.error("counts must be >= 1, measured windows > 0, warm-ups >= 0")
    args.phases = set(args.only or PHASES) - set(args.skip)
    args.tts_levels = TTS_LEVELS
    if args.quick:
        vars(args).update(QUICK)
    return args


def setup_cpus(args: argparse.Namespace) -> None:
    allowed = os.sched_getaffinity(0)
    args.pinned = (
        {args.server_cpu, args.client_cpu} <= allowed and args.server_cpu != args.client_cpu
    )
    if args.pinned:
        os.sched_setaffinity(0, {args.client_cpu})  # the generator is this process
        return
    print(f"bench: CPUs {args.server_cpu} and {args.client_cpu} are not both available "
          f"(allowed: {sorted(allowed)}); running unpinned", file=sys.stderr)


def keep_logs(workdir: Path, logs_dir: Path) -> None:
    """Copy the servers' stderr out of the temporary directory for a look after the run."""
    with contextlib.suppress(OSError):
        logs_dir.mkdir(parents=True, exist_ok=True)
        for old in logs_dir.glob("*.stderr.log"):
            old.unlink()
        for log in workdir.glob("*.stderr.log"):
            shutil.copyfile(log, logs_dir / log.name)


def tts_settings(workdir: Path, args: argparse.Namespace) -> tuple[SyntheticTtsConfig, int]:
    """The synthetic TTS engine's config and the frame size of the servers this run starts,
    read once at the start: the config schema this process imported then matches
    config/default.toml on disk then (a checkout edited during a long run would not)."""
    path, _ = write_config(workdir, "tts-settings", args)
    cfg = load_config(path, environ={})
    engine = cfg.tts.models["synthetic"]
    assert isinstance(engine, SyntheticTtsConfig)
    return engine, cfg.tts.session.chunk_ms


async def run_all(args: argparse.Namespace, workdir: Path) -> list[ServerRun]:
    runs: list[ServerRun] = []
    args.tts_settings = tts_settings(workdir, args)
    if "telephony" in args.phases:
        runs.append(await with_server(
            TELEPHONY_RUN, args, workdir, lambda live, run: measure_calls(live, run, args)))
    if "pipecat" in args.phases:
        if (PEER_VENV / "bin" / "python").exists():
            runs.append(await with_server(
                PEER_RUN, args, workdir, lambda live, run: measure_calls(live, run, args)))
        else:
            missing = ServerRun(PEER_RUN)
            missing.errors.append(f"no Pipecat virtualenv at {PEER_VENV}: run {PEER_SETUP} "
                                  "(`make bench` does)")
            runs.append(missing)
    for name in CLOSED_LOOP_NAMES:
        if name in args.phases:
            runs.append(await with_server(
                name, args, workdir, lambda live, run: measure_closed_loops(live, run, args)))
    if args.phases & {"idle", "tts"}:
        runs.append(await with_server(
            "streamgate-idle", args, workdir,
            lambda live, run: measure_idle_and_tts(live, run, args)))
    if "echo-realtime" in args.phases:
        runs.append(await with_server(
            REALTIME_CEILING, args, workdir, lambda live, run: measure_capacity(live, run, args)))
    if "realtime" in args.phases:
        runs.append(await with_server(
            "streamgate-realtime", args, workdir,
            lambda live, run: measure_capacity(live, run, args)))
    if "workers" in args.phases:
        for workers in (1, 2):
            runs.append(await with_server(
                f"{WORKERS_RUN}{workers}", args, workdir,
                functools.partial(measure_workers, args=args, workers=workers), workers))
    return runs


async def amain(args: argparse.Namespace, command: str) -> int:
    main_task = asyncio.current_task()
    if main_task is not None:  # SIGTERM behaves like Ctrl-C: cancel, clean up, exit
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="streamgate-bench-") as tmp:
        workdir = Path(tmp)
        # Run as root, PostgreSQL runs as the `postgres` account, which must reach its data
        # directory in here (else it would keep the cluster elsewhere, outliving the run).
        os.chmod(tmp, 0o711)
        try:
            runs = await run_all(args, workdir)
        finally:
            keep_logs(workdir, args.logs_dir)
    # In process, once the servers are gone: the libraries' cost per call frame (issue 15).
    args.call_floor = call_floor.measure(frames=50_000 if args.quick else 200_000)
    print()
    print("\n".join(result_sections(args, runs)))
    print("\n".join(observation_lines(runs)))
    # Issue 17: tracing off vs on at 100 %, on the ASR path in process (its own table).
    cost = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.tracing_cost",
        *(["--sessions", "20", "--seconds", "2", "--repeat", "1"] if args.quick
          else ["--seconds", "5"]), cwd=ROOT)
    await cost.wait()
    failed = [(run.name, run.failures()) for run in runs]
    failed = [(name, why) for name, why in failed if why]
    if args.no_write or args.only or args.skip or args.quick:
        pass
    elif failed or not all(run.has_results() for run in runs):
        print(f"bench: not writing {DOCS_PATH.relative_to(ROOT)}: a run failed", file=sys.stderr)
    else:
        DOCS_PATH.write_text(render_markdown(args, command, started, runs, ASR_PATH, TTS_PATH,
                                             TTS_FIRST_AUDIO_MS) + "\n")
        print(f"bench: wrote {DOCS_PATH.relative_to(ROOT)}")
    for name, why in failed:
        print(f"bench: {name}: FAILED: {'; '.join(why)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    import uvloop

    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m loadtest.bench" + (" " + shlex.join(given) if given else "")
    need = max(args.connections, args.idle_sessions, args.rt_max, args.realtime_sessions,
               args.workers_sessions, args.calls_max, args.calls, args.peer_max) + 256
    limit = raise_nofile_limit()
    if limit < need:
        print(f"bench: open-files limit {limit} < {need} needed; raise `ulimit -n`",
              file=sys.stderr)
        return 2
    setup_cpus(args)
    try:
        return uvloop.run(amain(args, command))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C / SIGTERM
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_all_servers()


if __name__ == "__main__":
    sys.exit(main())
