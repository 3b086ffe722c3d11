"""Frames/s through three servers on one core: `python -m loadtest.bench` (`make bench`).

One command, one process tree, one run. Each server runs alone, pinned to one CPU (0 by
default); the load generator runs in this process, pinned to another CPU (1):

  ws-echo     websockets' asyncio server (uvloop), a text ack per binary frame
  raw-echo    asyncio.Protocol + websockets' sans-I/O ServerProtocol (uvloop), ack inline in
              data_received: the ceiling for this design on one core
  streamgate  `python -m server serve` with a temporary config: the full ASR ingest path
              (mu-law decode, soxr 8k->16k, webrtcvad, utterances, synthetic engine), acked by
              `credit` (the credit window is set to 4 frames, so every 20 ms frame is credited)

Closed loop, "ack per frame": every connection has one 160-byte frame in flight. After a
warm-up, acknowledged frames are counted for --seconds; per-frame ack latency, server CPU and
RSS (with every connection open) are recorded. `--realtime-sessions N` adds an open-loop run:
N streamgate sessions each sending a frame every 20 ms, reporting frame-to-credit latency.

Results are printed and written to docs/benchmarks.md (unless --no-write, or a server gave no
result); the servers' stderr is kept in loadtest/reports/last-run/ (git-ignored). Cleanup: servers
get SIGTERM then SIGKILL on exit, error, Ctrl-C or SIGTERM, and die with the bench if it is killed
(PR_SET_PDEATHSIG, see loadtest/pin.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from loadtest.loadgen import (
    FRAME_BYTES,
    FRAME_MS,
    SIGNALS,
    AckMode,
    ProbeSample,
    RunResult,
    Target,
    format_result,
    run_closed_loop,
    run_realtime,
)
from loadtest.pin import raise_nofile_limit

ROOT = Path(__file__).resolve().parent.parent
DOCS_PATH = ROOT / "docs" / "benchmarks.md"
LOGS_DIR = ROOT / "loadtest" / "reports" / "last-run"  # servers' stderr (git-ignored)
HOST = "127.0.0.1"
ASR_PATH = (
    "/v1/asr/stream?model=synthetic&encoding=mulaw&sample_rate=8000&vad=medium"
    "&interim_results=false"
)
SERVER_NAMES = ("ws-echo", "raw-echo", "streamgate")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0

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
max_connections = {max_connections}

[logging]
level = "WARNING"

[auth]
allow_anonymous = true

[billing]
# Off: anonymous keys from [auth], sessions priced but not charged; no Redis/PostgreSQL needed.
enabled = false

[asr.session]
default_model = "synthetic"
ingest_queue_ms = 80

[asr.models.synthetic]
engine = "synthetic"
latency_base_ms = 5.0
latency_per_item_ms = 0.5
max_batch = 32
max_wait_ms = 5.0
"""


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
        self._clk_tck = os.sysconf("SC_CLK_TCK")

    async def start(self) -> dict[str, Any]:
        """Spawn and wait for the `{"event":"listening",...}` line on stdout."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGATE_")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.name == "streamgate":
            env["STREAMGATE_STRICT_TASKS"] = "1"  # exit code 3 if tasks leak at shutdown
        self._spawn(env)
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        deadline = time.monotonic() + START_TIMEOUT_S
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
        await self.stop()
        raise RuntimeError(
            f"{self.name} did not start (exit {self.returncode}):\n{self.stderr_tail()}"
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

    def sample(self) -> ProbeSample:
        user = system = 0.0
        reads = writes = sleeps = 0
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{self.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            user, system = int(fields[11]) / self._clk_tck, int(fields[12]) / self._clk_tck
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
        return ProbeSample(user, system, reads, writes, sleeps, busy, steal, gen_busy)

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to timeout_s, then SIGKILL."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
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
        ServerProcess.live.discard(self)


def cpu_stat() -> dict[int, tuple[float, float]]:
    """Per CPU from /proc/stat: (user + nice + system seconds, steal seconds)."""
    tck = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[float, float]] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat") as fh:
            for line in fh:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                f = line.split()
                out[int(f[0][3:])] = ((int(f[1]) + int(f[2]) + int(f[3])) / tck, int(f[8]) / tck)
    return out


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


# --- what a run reports --------------------------------------------------------------------------


@dataclass
class Health:
    """Streamgate (or echo server) behaviour seen from outside: logs, exit code, metrics."""

    alive_after_close: bool = True
    exit_code: int | None = None
    log_levels: dict[str, int] = field(default_factory=dict)
    log_messages: list[tuple[str, int]] = field(default_factory=list)  # most common first
    raw_lines: list[str] = field(default_factory=list)  # non-JSON stderr (tracebacks...)
    metrics: dict[str, float] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if not self.alive_after_close:
            out.append("server died during the run")
        if self.exit_code not in (0, None):
            out.append(f"exit code {self.exit_code}")
        bad = {k: v for k, v in self.log_levels.items() if k in ("error", "critical")}
        if bad:
            out.append("log: " + ", ".join(f"{v} {k}" for k, v in bad.items()))
        if self.raw_lines:
            out.append(f"{len(self.raw_lines)} non-JSON stderr lines")
        return out


@dataclass
class ServerRun:
    name: str
    result: RunResult | None
    health: Health
    error: str = ""

    def failures(self) -> list[str]:
        """What makes this run's numbers untrustworthy (empty if none)."""
        out = [self.error] if self.error else []
        r = self.result
        if r is not None:
            if r.connect_failures:
                out.append(f"{sum(r.connect_failures.values())} connections failed to open")
            if r.dropped:
                out.append(f"{r.dropped} connections dropped")
            if r.server_closes:
                out.append(f"{sum(r.server_closes.values())} connections closed by the server")
        if r is None:
            pass  # it never ran: the error says why
        elif not self.health.alive_after_close:
            out.append("server died")
        elif self.health.exit_code not in (0, None):
            out.append(f"server exit code {self.health.exit_code}")
        return out


def analyse_stderr(path: Path, json_logs: bool) -> Health:
    health = Health()
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return health
    for line in text.splitlines():
        if not line.strip():
            continue
        rec: object = None
        if json_logs:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
        if isinstance(rec, dict):
            level = str(rec.get("level", "?"))
            levels[level] += 1
            exc = str(rec.get("exc", "")).strip().splitlines()
            tail = f" [{exc[-1]}]" if exc else ""
            messages[f"{level} {rec.get('logger', '')}: {rec.get('msg', '')}{tail}"[:240]] += 1
        elif len(health.raw_lines) < 40:
            health.raw_lines.append(line[:240])
    health.log_levels = dict(levels)
    health.log_messages = messages.most_common(8)
    return health


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


def _labels(key: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', key))


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_RE.match(line.strip())
        if match and match.group(1) in _WANTED:
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


# --- one server, one run -------------------------------------------------------------------------


def server_argv(name: str, config_path: Path) -> list[str]:
    if name == "streamgate":
        return [sys.executable, "-m", "server", "serve", "--config", str(config_path),
                "--host", HOST, "--ws-port", "0", "--http-port", "0"]
    return [sys.executable, "-m", "loadtest.echo_servers", name, "--host", HOST, "--port", "0"]


def write_config(workdir: Path, connections: int) -> Path:
    path = workdir / "streamgate-bench.toml"
    path.write_text(STREAMGATE_TOML.format(max_connections=max(10000, connections + 100)))
    return path


async def bench_server(
    name: str, args: argparse.Namespace, workdir: Path, *, realtime: bool = False
) -> ServerRun:
    config = write_config(workdir, max(args.connections, args.realtime_sessions))
    server = ServerProcess(name if not realtime else "streamgate-realtime",
                           server_argv(name, config),
                           args.server_cpu if args.pinned else None, workdir,
                           args.client_cpu if args.pinned else None)
    ack: AckMode = "credit" if name == "streamgate" else "echo"
    path = ASR_PATH if name == "streamgate" else "/"
    result: RunResult | None = None
    error = ""
    if args.pinned and args.quiet_wait > 0:
        warning = await wait_for_quiet([args.server_cpu, args.client_cpu], args.quiet_wait)
        if warning:
            print(f"bench: {warning}", flush=True)
    try:
        info = await server.start()
        print(f"bench: {server.name} pid {server.pid}"
              + (f" on CPU {args.server_cpu}" if args.pinned else "") + f", {info}", flush=True)
        await asyncio.sleep(0.5)  # let start-up settle (imports, engine start) before RSS idle
        target = Target(HOST, int(info["ws_port"]), path, ack)
        budget = args.warmup + args.seconds + 60.0 + 20.0 * (
            max(args.connections, args.realtime_sessions) / max(1, args.batch))
        async with asyncio.timeout(budget):
            if realtime:
                result = await run_realtime(
                    target, sessions=args.realtime_sessions, warmup_s=args.warmup,
                    seconds=args.seconds, batch=args.batch, probe=server,
                    signal=args.signal)
            else:
                result = await run_closed_loop(
                    target, connections=args.connections, warmup_s=args.warmup,
                    seconds=args.seconds, batch=args.batch, probe=server,
                    signal=args.signal)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    await asyncio.sleep(0.5)  # sessions settle after the close handshakes
    alive = server.alive()
    metrics: dict[str, float] = {}
    http_port = server.info.get("http_port")
    if name == "streamgate" and alive and http_port:
        try:
            metrics = parse_metrics(await http_get(int(http_port), "/metrics"))
        except (OSError, TimeoutError) as exc:
            error = error or f"/metrics failed: {exc}"
    exit_code = await server.stop()
    health = analyse_stderr(server.stderr_path, json_logs=name == "streamgate")
    health.alive_after_close = alive
    health.exit_code = exit_code
    health.metrics = metrics
    return ServerRun(name, result, health, error)


# --- reporting -----------------------------------------------------------------------------------


def _mb(kb: int | None) -> str:
    return "-" if not kb else f"{kb / 1024:.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _cpu(r: RunResult) -> str:
    if r.server_cpu_pct is None:
        return "-"
    return f"{r.server_cpu_pct:.0f}% ({r.server_sys_pct or 0:.0f}% sys)"


def machine_info() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = []
    for pkg in ("websockets", "uvloop", "numpy", "soxr", "webrtcvad-wheels", "msgspec"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{pkg} {metadata.version(pkg)}")
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": ", ".join(versions),
    }


def results_table(runs: list[ServerRun]) -> list[str]:
    head = ("| server | conns | frames/s | p50 ms | p99 ms | max ms | server CPU | gen CPU "
            "| RSS idle MB | RSS open MB | KB/conn |")
    lines = [head, "|---" * 11 + "|"]
    for run in runs:
        r = run.result
        if r is None:
            lines.append(f"| {run.name} | failed: {run.error} |" + " |" * 9)
            continue
        per_conn = "-"
        if r.rss_idle_kb and r.rss_open_kb and r.opened:
            per_conn = f"{(r.rss_open_kb - r.rss_idle_kb) / r.opened:.1f}"
        lat = r.latency
        lines.append(
            f"| {run.name} | {r.opened}/{r.requested} | {r.fps:,.0f} | {lat.p50_ms:.2f} "
            f"| {lat.p99_ms:.2f} | {lat.max_ms:.1f} | {_cpu(r)} "
            f"| {_pct(r.gen_cpu_pct)} | {_mb(r.rss_idle_kb)} | {_mb(r.rss_open_kb)} "
            f"| {per_conn} |"
        )
    return lines


def ratio_lines(runs: list[ServerRun]) -> list[str]:
    fps = {run.name: run.result.fps for run in runs if run.result and run.result.fps > 0}
    out = []
    if "streamgate" in fps:
        for ref in ("raw-echo", "ws-echo"):
            if ref in fps:
                out.append(f"streamgate / {ref} = {fps['streamgate'] / fps[ref]:.2f}")
    if "raw-echo" in fps and "ws-echo" in fps:
        out.append(f"raw-echo / ws-echo = {fps['raw-echo'] / fps['ws-echo']:.2f}")
    return out


def notes_for(run: ServerRun) -> list[str]:
    out: list[str] = []
    r, h = run.result, run.health
    if run.error:
        out.append(f"error: {run.error}")
    if r is not None:
        if r.mode == "closed-loop" and r.server_cpu_pct is not None and r.server_cpu_pct < 90:
            out.append(
                f"NOT SERVER-BOUND: the server was only {r.server_cpu_pct:.0f}% busy (generator "
                f"{r.gen_cpu_pct:.0f}%, other processes on the generator's CPU "
                f"{r.others_on_gen_cpu_pct or 0:.0f}%): frames/s is a lower bound")
        if r.server_reads_per_frame is not None and r.server_writes_per_frame is not None:
            out.append(f"server syscalls per acked frame: {r.server_reads_per_frame:.2f} reads, "
                       f"{r.server_writes_per_frame:.2f} writes; event loop slept "
                       f"{r.server_sleeps_per_s or 0:,.0f} times/s")
        if r.others_on_server_cpu_pct is not None:
            # Others on the server's CPU always cost throughput (on the generator's CPU only
            # when the server ends up waiting for the generator: see NOT SERVER-BOUND).
            shared = r.others_on_server_cpu_pct > 5 or (r.steal_pct or 0) > 2
            out.append(
                f"other processes used {r.others_on_server_cpu_pct:.0f}% of the server's CPU "
                f"and {r.others_on_gen_cpu_pct or 0:.0f}% of the generator's; steal "
                f"{r.steal_pct or 0:.0f}%" + (" - SHARED CPU, numbers depressed" if shared
                                                 else ""))
        if r.connect_failures:
            out.append(f"connect failures: {r.connect_failures}")
        if r.server_closes:
            out.append(f"server-initiated closes: {r.server_closes}")
        if r.dropped:
            out.append(f"connections dropped without a close handshake: {r.dropped}")
        if r.aborted_at_close:
            out.append(f"connections not closed within 5 s of our close frame: "
                       f"{r.aborted_at_close}")
        if r.text_types:
            out.append(f"other server messages: {dict(sorted(r.text_types.items()))}")
        if r.pings:
            out.append(f"pings answered: {r.pings}")
        for sample in r.samples[:5]:
            out.append(f"server said: {sample}")
    out.extend(f"problem: {p}" for p in h.problems())
    for msg, count in h.log_messages:
        out.append(f"log x{count}: {msg}")
    out.extend(f"stderr: {line}" for line in h.raw_lines[:10])
    if h.metrics:
        sessions = {_labels(k).get("code", "?"): int(v) for k, v in h.metrics.items()
                    if k.startswith("streamgate_sessions_total")}
        if sessions:
            out.append(f"sessions ended by close code (server metric; the bench closes every "
                       f"connection with a 1000 close frame): {sessions}")
        batches = h.metrics.get('streamgate_engine_batch_size_count{model="synthetic"}')
        items = h.metrics.get('streamgate_engine_batch_size_sum{model="synthetic"}')
        if batches:
            out.append(f"engine batches: {batches:.0f}, mean size {(items or 0) / batches:.1f}")
        for key, value in h.metrics.items():
            if key.startswith(("streamgate_upgrades_rejected", "streamgate_engine_errors",
                               "streamgate_audio_dropped")) and value:
                out.append(f"{key} = {value:g}")
    return out


def realtime_lines(run: ServerRun, sessions: int) -> list[str]:
    r = run.result
    if r is None:
        return [f"real-time run failed: {run.error}"]
    lat = r.latency
    keeps_up = (r.fps >= 0.99 * (r.target_fps or 0) and lat.p99_ms < 100.0
                and r.opened == sessions)
    fin = r.final_latency
    finals = "-" if fin is None or not fin.samples else (
        f"{fin.p50_ms / 1000:.2f} / {fin.p99_ms / 1000:.2f} s (n={fin.samples})")
    return [
        "| sessions | target frames/s | acked frames/s | p50 ms | p99 ms | max ms | deferred "
        "| final p50 / p99 | server CPU | gen CPU | RSS open MB | keeps up |",
        "|---" * 12 + "|",
        f"| {r.opened}/{sessions} | {r.target_fps or 0:,.0f} | {r.fps:,.0f} | {lat.p50_ms:.2f} "
        f"| {lat.p99_ms:.2f} | {lat.max_ms:.1f} | {r.deferred} | {finals} | {_cpu(r)} "
        f"| {_pct(r.gen_cpu_pct)} | {_mb(r.rss_open_kb)} | {'yes' if keeps_up else 'NO'} |",
    ]


def render_markdown(
    args: argparse.Namespace, command: str, started: datetime, runs: list[ServerRun],
    realtime: ServerRun | None,
) -> str:
    mi = machine_info()
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m loadtest.bench` (`make bench`); every run overwrites this file.",
        "",
        "**What is measured.** Frames per second through one server process pinned to one CPU,",
        "with the load generator (raw asyncio Protocols, uvloop, hand-built masked frames) pinned",
        "to another CPU, over 127.0.0.1. Closed loop, \"ack per frame\": each connection keeps",
        f"exactly one {FRAME_BYTES}-byte frame ({FRAME_MS} ms of 8 kHz mu-law) in flight and sends",
        "the next one when it is acknowledged. The audio (`--signal speech`, the default) is a",
        "2.4 s loop: 1.6 s of synthetic voiced syllables (gliding pitch, harmonics, formants),",
        "0.8 s of low noise. webrtcvad calls it speech, so streamgate runs onset, engine feeds,",
        "endpointing and one final transcript per loop. (`--signal tone`, a stationary 300 Hz",
        "tone plus noise, is classified as noise after its first frames: VAD runs, the engine",
        "path does not.) Three servers, each started fresh:",
        "",
        "- **ws-echo**: websockets' asyncio server (`websockets.asyncio.server.serve`, uvloop),",
        "  a handler task per connection answering each binary frame with a small text frame.",
        "- **raw-echo**: asyncio.Protocol + websockets' sans-I/O `ServerProtocol` (uvloop), the",
        "  ack written inline in `data_received`: the ceiling for streamgate's design.",
        "- **streamgate**: `python -m server serve` with the full ASR ingest path on",
        f"  `{ASR_PATH}`",
        "  (mu-law decode, soxr 8k->16k, webrtcvad, utterance tracking, synthetic engine through",
        "  the micro-batcher); the ack is a `credit` message. The bench config sets",
        "  `asr.session.ingest_queue_ms = 80` (credit window 4 frames, one `credit` per 20 ms",
        "  frame), `auth.allow_anonymous = true`, `logging.level = \"WARNING\"`,",
        "  `server.idle_timeout_s = 60`, `billing.enabled = false` (anonymous sessions, priced",
        "  but not charged: no Redis/PostgreSQL in the path) and the default synthetic model",
        "  (5 ms + 0.5 ms/item, batches of up to 32).",
        "",
        "Latency is per frame, from send to its ack. Server CPU is the server process's",
        "user+system time over the measurement window (100% = one core, the most it can use);",
        "generator CPU likewise for the load generator (near 100% with the server well below",
        "would mean the generator, not the server, is the limit). RSS is the server's VmRSS",
        "before any connection and with all connections open; KB/conn is the difference per",
        "connection. It is the server process only: the two pocketsphinx worker processes",
        "streamgate also starts (config/default.toml configures `sphinx-en`, and a layered",
        "config cannot remove a model) are idle here and not counted.",
        "",
        "**Reading the numbers.** This runs on a small shared machine: absolute frames/s move",
        "between runs by 10-20%. The ratios between servers measured in the same run (same",
        "machine, same minute) are what count; compare ratios, not absolute numbers, across",
        "runs. The observations below say how much of the two pinned CPUs other processes took",
        "during the window (\"SHARED CPU\" when it was more than a few percent of the server's",
        "CPU, \"NOT SERVER-BOUND\" when the server was not saturated in the closed loop). The",
        "DESIGN.md yardsticks (640-byte frames) were ~45k frames/s for ws-echo and",
        "~89k for raw-echo on one core of such a machine; this bench sends 160-byte frames.",
        "",
        "## Latest run",
        "",
        f"- Command: `{command}`",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- Machine: {mi['nproc']} CPUs, {mi['cpu']}, Linux {mi['kernel']}",
        f"- Python {mi['python']}; {mi['packages']}",
        f"- Parameters: {args.connections} connections (opened {args.batch} at a time), "
        f"warm-up {args.warmup:g} s, measured {args.seconds:g} s; "
        + (f"server on CPU {args.server_cpu}, generator on CPU {args.client_cpu}"
           if args.pinned else "unpinned (fewer than 2 CPUs available)"),
        f"- Audio signal: `{args.signal}`",
        "",
    ]
    if runs:
        lines += ["### Closed loop, ack per frame", "", *results_table(runs), ""]
    ratios = ratio_lines(runs)
    if ratios:
        lines += ["Ratios (same run): " + "; ".join(f"**{r}**" for r in ratios), ""]
    if realtime is not None:
        lines += [
            "### Real-time sessions (streamgate, open loop)",
            "",
            f"Each session sends one {FRAME_MS} ms frame every {FRAME_MS} ms (phases spread "
            "over 20 ms) and never exceeds its credit; latency is frame-to-credit from the "
            "frame's scheduled time; \"deferred\" counts frames that had to wait for credit. "
            "\"Final\" is the time from the end of an utterance's audio (its `end_ms`) to its "
            "final transcript; it includes the 500 ms of silence the VAD needs to end an "
            "utterance and the engine's batching. \"Keeps up\" means acked >= 99% of target "
            "and frame-to-credit p99 < 100 ms.",
            "",
            *realtime_lines(realtime, args.realtime_sessions),
            "",
        ]
    notes = [(run.name, notes_for(run)) for run in [*runs, *([realtime] if realtime else [])]]
    if any(n for _, n in notes):
        lines += ["### Observations", ""]
        for name, items in notes:
            for item in items:
                lines.append(f"- {name}: {item}")
        lines.append("")
    return "\n".join(lines)


def keep_logs(workdir: Path) -> None:
    """Copy the servers' stderr out of the temporary directory for a look after the run."""
    with contextlib.suppress(OSError):
        LOGS_DIR.mkdir(parents=True, exist_ok=True)
        for old in LOGS_DIR.glob("*.stderr.log"):
            old.unlink()
        for log in workdir.glob("*.stderr.log"):
            shutil.copyfile(log, LOGS_DIR / log.name)


def print_report(runs: list[ServerRun], realtime: ServerRun | None, sessions: int) -> None:
    print()
    if runs:
        print("\n".join(results_table(runs)))
    ratios = ratio_lines(runs)
    if ratios:
        print("ratios: " + "; ".join(ratios))
    if realtime is not None:
        print()
        print("\n".join(realtime_lines(realtime, sessions)))
    for run in [*runs, *([realtime] if realtime else [])]:
        for note in notes_for(run):
            print(f"  {run.name}: {note}")


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--only", action="append", choices=SERVER_NAMES,
                   help="run only this server (repeatable)")
    p.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument("--realtime-sessions", type=int, default=0, metavar="N",
                   help="also run N real-time streamgate sessions (1 frame / 20 ms), default off")
    p.add_argument("--realtime-only", action="store_true",
                   help="with --realtime-sessions: skip the closed-loop runs")
    p.add_argument("--batch", type=int, default=100, help="connections opened at a time")
    p.add_argument("--signal", choices=SIGNALS, default="speech",
                   help="audio sent: speech-like loop (default) or a stationary 300 Hz tone")
    p.add_argument("--quiet-wait", type=float, default=20.0, metavar="S",
                   help="before each server, wait up to S s for the pinned CPUs to be idle "
                        "(other processes < 10%%); 0 = do not wait")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    args = p.parse_args(argv)
    if args.connections < 1 or args.seconds <= 0 or args.warmup < 0 or args.batch < 1:
        p.error("--connections and --batch must be >= 1, --seconds > 0, --warmup >= 0")
    if args.realtime_only and args.realtime_sessions < 1:
        p.error("--realtime-only needs --realtime-sessions N")
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


async def amain(args: argparse.Namespace, command: str) -> int:
    main_task = asyncio.current_task()
    if main_task is not None:  # SIGTERM behaves like Ctrl-C: cancel, clean up, exit
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    started = datetime.now(UTC)
    names = [n for n in SERVER_NAMES if not args.only or n in args.only]
    if args.realtime_only:
        names = []
    runs: list[ServerRun] = []
    realtime: ServerRun | None = None
    with tempfile.TemporaryDirectory(prefix="streamgate-bench-") as tmp:
        workdir = Path(tmp)
        for name in names:
            print(f"bench: {name}: {args.connections} connections, warm-up {args.warmup:g} s, "
                  f"measuring {args.seconds:g} s ...", flush=True)
            run = await bench_server(name, args, workdir)
            runs.append(run)
            if run.result is not None:
                print(f"bench: {name}: {format_result(run.result)}", flush=True)
            else:
                print(f"bench: {name}: FAILED: {run.error}", flush=True)
            await asyncio.sleep(1.0)
        if args.realtime_sessions > 0:
            print(f"bench: streamgate real time: {args.realtime_sessions} sessions ...",
                  flush=True)
            realtime = await bench_server("streamgate", args, workdir, realtime=True)
            realtime.name = "streamgate-realtime"
            if realtime.result is not None:
                print(f"bench: real time: {format_result(realtime.result)}", flush=True)
        keep_logs(workdir)
    print_report(runs, realtime, args.realtime_sessions)
    no_result = [r.name for r in [*runs, *([realtime] if realtime else [])] if r.result is None]
    if args.no_write:
        pass
    elif no_result:
        print(f"bench: not writing {DOCS_PATH.relative_to(ROOT)}: no result for "
              f"{', '.join(no_result)}", file=sys.stderr)
    else:
        DOCS_PATH.write_text(render_markdown(args, command, started, runs, realtime) + "\n")
        print(f"bench: wrote {DOCS_PATH.relative_to(ROOT)}")
    failed = [(r.name, r.failures()) for r in [*runs, *([realtime] if realtime else [])]]
    failed = [(name, why) for name, why in failed if why]
    for name, why in failed:
        print(f"bench: {name}: FAILED: {'; '.join(why)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    import uvloop

    args = parse_args(argv)
    command = "python -m loadtest.bench" + (
        " " + shlex.join(sys.argv[1:] if argv is None else argv)
        if (sys.argv[1:] if argv is None else argv) else "")
    need = max(args.connections, args.realtime_sessions) + 256
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
