"""The supervisor of `streamgate serve --workers N`: N worker processes on both ports, restarted
when they die, drained together on SIGTERM/SIGINT.

Steady state costs the supervisor nothing but sleeping: it waits on the workers' exits, their
stdout pipes (one line each at start) and the port guards' questions; there is no polling loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from server.config import Config
from server.supervisor.ports import ReservedPort, reserve_port
from server.supervisor.restart_backoff import RestartBackoff
from server.supervisor.worker_config import shared_worker_config, write_worker_config
from server.telemetry.logging import setup_logging
from server.telemetry.metrics import MULTIPROC_DIR_ENV, mark_process_dead
from server.ws.port_guard import DEPLOYMENT_ENV, PortInUse, deployment_id

if TYPE_CHECKING:
    from server.supervisor.node_stores import NodeStores

log = logging.getLogger("streamgate.supervisor")
WORKER_MODULE = "server.supervisor.worker"
# tmpfs when there is one: workers write their metric files through mmap on every update.
SHARED_MEMORY_DIR = Path("/dev/shm")


@dataclass(slots=True)
class WorkerSlot:
    """One of the N places a worker runs in; its successive processes restart in it."""

    index: int
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    proc: asyncio.subprocess.Process | None = None
    listening: bool = False
    started_at: float = 0.0
    final_code: int | None = None  # how its last process ended once the node was stopping


class WorkerPool:
    """Starts, watches and restarts the workers; forwards stop signals to them."""

    def __init__(self, count: int, argv: list[str], env: Mapping[str, str], *,
                 metrics_dir: Path, lifeline_fd: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = [WorkerSlot(i) for i in range(count)]
        self._argv = argv
        self._env = dict(env)
        self._metrics_dir = metrics_dir
        self._lifeline_fd = lifeline_fd
        self._clock = clock
        self.stopping = False
        self._stop_requested = asyncio.Event()  # cuts restart waits short
        self.up = asyncio.Event()  # every worker has been listening once: the node is up
        self.failed_start: int | None = None  # a worker's exit code before the node was up

    def forward(self, sig: signal.Signals) -> None:
        """SIGTERM/SIGINT: no more restarts; every worker gets the signal (a second one ends
        their drain notice early, as it does for a single process)."""
        if not self.stopping:
            log.info("supervisor stopping", extra={"signal": sig.name})
        self.stopping = True
        self._stop_requested.set()
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    async def run(self) -> None:
        await asyncio.gather(*(self._keep_running(slot) for slot in self.slots))

    def exit_code(self) -> int:
        if self.failed_start is not None:
            return self.failed_start if self.failed_start > 0 else 1
        for slot in self.slots:
            if slot.final_code:
                return slot.final_code if slot.final_code > 0 else 1
        return 0

    async def _keep_running(self, slot: WorkerSlot) -> None:
        while not self.stopping:
            listened, code = await self._run_once(slot)
            if self.stopping:
                # A worker still starting dies of the forwarded signal (its handler comes with
                # `listening`): it had nothing to drain, which is a clean stop.
                stopped_early = not listened and -code in (signal.SIGTERM, signal.SIGINT)
                slot.final_code = 0 if stopped_early else code
                return
            if not self.up.is_set():
                # It died before the node came up (bad configuration, a port taken): restarting
                # would fail the same way. The node does not start.
                self.failed_start = code
                log.error("worker failed before the node was up: stopping the node",
                          extra={"worker": slot.index, "code": code})
                self.forward(signal.SIGTERM)
                return
            delay = slot.backoff.delay_after(self._clock() - slot.started_at)
            log.warning("worker restarting", extra={
                "worker": slot.index, "delay_s": delay, "failures": slot.backoff.failures})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay)

    async def _run_once(self, slot: WorkerSlot) -> tuple[bool, int]:
        """Run one process in `slot` to its end: whether it got to listen, and its exit code."""
        proc = await asyncio.create_subprocess_exec(
            *self._argv, str(slot.index), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, env=self._env, pass_fds=(self._lifeline_fd,),
            # Its own process group: a Ctrl-C in the terminal reaches the supervisor only, which
            # forwards it once; otherwise every worker would see it twice.
            start_new_session=True,
        )
        slot.proc, slot.started_at, slot.listening = proc, self._clock(), False
        if self.stopping:  # the signal came while this worker was being spawned
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        log.info("worker started", extra={"worker": slot.index, "pid": proc.pid})
        reader = asyncio.ensure_future(self._read_stdout(slot, proc))
        try:
            code = await proc.wait()
        finally:
            # A grandchild holding the pipe must not keep us waiting for its end of file.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(reader, 1.0)
        listened = slot.listening
        slot.proc, slot.listening = None, False
        # Its live gauges (sessions, connections) leave the node's /metrics with it; its
        # counters stay, so the node's totals never go backwards.
        mark_process_dead(proc.pid, str(self._metrics_dir))
        extra: dict[str, object] = {"worker": slot.index, "pid": proc.pid, "code": code}
        if code < 0:
            try:
                extra["signal"] = signal.Signals(-code).name
            except ValueError:  # a real-time signal has no name
                extra["signal"] = str(-code)
        if self.stopping and code == 0:
            log.info("worker exited", extra=extra)
        else:
            log.warning("worker exited", extra=extra)
        return listened, code

    async def _read_stdout(self, slot: WorkerSlot, proc: asyncio.subprocess.Process) -> None:
        """A worker prints one `listening` line when it serves; anything else passes through."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = None
            if isinstance(event, dict) and event.get("event") == "listening":
                slot.listening = True
                log.info("worker listening", extra={"worker": slot.index, "pid": proc.pid})
                if all(s.listening for s in self.slots):
                    self.up.set()
                continue
            sys.stdout.write(raw.decode(errors="replace"))
            sys.stdout.flush()


RUNTIME_PREFIX = "streamgate-node-"


def _runtime_dir() -> Path:
    """A private (0700) directory for the node: the workers' configuration and metric files.
    Its name carries the supervisor's pid, so the next supervisor can remove what one that was
    SIGKILLed left behind."""
    parent = SHARED_MEMORY_DIR if os.access(SHARED_MEMORY_DIR, os.W_OK) else \
        Path(tempfile.gettempdir())
    _remove_orphaned(parent)
    return Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{os.getpid()}-", dir=parent))


def _remove_orphaned(parent: Path) -> None:
    for path in parent.glob(f"{RUNTIME_PREFIX}*-*"):
        pid_text = path.name[len(RUNTIME_PREFIX):].partition("-")[0]
        try:
            if not pid_text.isdigit() or path.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)  # its supervisor is gone
        except OSError:
            continue  # alive under another user, or the directory vanished meanwhile


def _reserve_ports(cfg: Config, deployment: str) -> tuple[ReservedPort, ReservedPort]:
    srv = cfg.server
    ws = reserve_port(srv.host, srv.ws_port, deployment)
    try:
        return ws, reserve_port(srv.host, srv.http_port, deployment)
    except BaseException:
        ws.close()
        raise


def _print_event(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def supervise(config: Config, count: int) -> int:
    setup_logging(config.logging.level, config.logging.json)
    # Fresh for every node, so only this supervisor's workers may share its ports; unless the
    # operator names the deployment (several nodes on one host, on different addresses).
    deployment = deployment_id() or secrets.token_hex(16)
    try:
        ws_port, http_port = _reserve_ports(config, deployment)
    except PortInUse as exc:
        print(f"streamgate: {exc}", file=sys.stderr, flush=True)
        return 2
    runtime = _runtime_dir()
    metrics_dir = runtime / "metrics"
    metrics_dir.mkdir()
    lifeline_r, lifeline_w = os.pipe()
    env = {**os.environ, DEPLOYMENT_ENV: deployment, MULTIPROC_DIR_ENV: str(metrics_dir)}
    config_path = runtime / "config.json"
    pool = WorkerPool(count, [sys.executable, "-m", WORKER_MODULE, str(config_path),
                              str(lifeline_r)],
                      env, metrics_dir=metrics_dir, lifeline_fd=lifeline_r)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pool.forward, sig)
    stores: NodeStores | None = None
    try:
        for reserved in (ws_port, http_port):
            if reserved.guard is not None:
                reserved.guard.serve()
        admin_token = config.billing.admin_token or secrets.token_urlsafe(24)
        if config.billing.enabled:
            # Imported only here: billing's clients (redis, asyncpg) would otherwise stay in
            # the supervisor's memory for nothing.
            from server.supervisor.node_stores import prepare_node_stores

            stores = await prepare_node_stores(config)
        write_worker_config(shared_worker_config(
            config, ws_port=ws_port.port, http_port=http_port.port, admin_token=admin_token,
            urls=stores.urls if stores is not None else None), config_path)
        code = await _serve(config, pool, count, ws_port.port, http_port.port, admin_token,
                            stores)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if stores is not None:
            await stores.stop()  # after every worker has flushed its usage
        ws_port.close()
        http_port.close()
        os.close(lifeline_r)
        os.close(lifeline_w)
        shutil.rmtree(runtime, ignore_errors=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    log.info("supervisor exited", extra={
        "code": code, "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "rss_kb": _rss_kb()})
    return code


def _rss_kb() -> int | None:
    """Resident memory now (ru_maxrss would report the CLI's peak from before the exec)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


async def _serve(config: Config, pool: WorkerPool, count: int, ws_port: int, http_port: int,
                 admin_token: str, stores: NodeStores | None) -> int:
    if pool.stopping:  # a signal came while the stores were being prepared
        return 0
    running = asyncio.ensure_future(pool.run())
    up = asyncio.ensure_future(pool.up.wait())
    await asyncio.wait((running, up), return_when=asyncio.FIRST_COMPLETED)
    up.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await up
    if pool.up.is_set():
        # The same lines a single process prints, once for the node.
        _print_event(event="listening", host=config.server.host, ws_port=ws_port,
                     http_port=http_port, workers=count)
        if config.billing.enabled and not config.billing.admin_token:
            _print_event(event="admin_token", admin_token=admin_token)
        if stores is not None and stores.dev_key is not None:
            from server.infra.stores import dev_key_file

            _print_event(event="dev_api_key", tenant_id="dev", api_key=stores.dev_key,
                         saved_in=str(dev_key_file(config)))
        log.info("listening", extra={"ws_port": ws_port, "http_port": http_port,
                                     "workers": count, "pid": os.getpid()})
    await running
    if pool.failed_start is None:
        log.info("drain complete")
    return pool.exit_code()


def run_supervisor(config: Config, count: int) -> int:
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        return uvloop.run(supervise(config, count))
    return 0
