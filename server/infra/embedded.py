"""Embedded Redis and PostgreSQL for development and tests.

`streamgate serve` needs a Redis and a PostgreSQL. On a fresh machine only the Debian packages
are installed (scripts/setup.sh installs `redis-server` and `postgresql`), and nothing is
running, so when no REDIS_URL / DATABASE_URL is configured the server starts its own servers
from those packages' binaries, with their data under `<repo>/.streamgate/`. The test suite does
the same on free ports under its temporary directory.

Both classes first look for a server already answering on the port and reuse it instead of
starting a second one; a reused server is never stopped by us. Servers we start are our child
processes, each in its own session so that a Ctrl-C in the terminal reaches only streamgate, which
then shuts down in order (drain sessions, flush billing to Postgres, then stop Postgres and Redis).

The PostgreSQL started here runs with fsync, synchronous_commit and full_page_writes off: fast
to start and to write, and it survives its own processes being killed (the fault tests do that)
minus the last ~0.6 s of commits, but NOT an OS crash or power loss. It is for development and
tests only; production deployments configure DATABASE_URL to point at a real server.

PostgreSQL refuses to run as root. When we are root, initdb and postgres run as the `postgres`
system account (or `nobody` if there is none; or the owner of an existing cluster), which then
owns the data directory. That account must be able to reach the directory: if a parent
directory is closed to it (e.g. /root, or pytest's /tmp/pytest-of-root, both mode 0700), the
cluster is kept in `<tmpdir>/streamgate-pg-<hash of data_dir>` instead (same place every
time for the same data_dir; gone after a reboot if /tmp is a tmpfs); see EmbeddedPostgres.pgdata.
A non-empty directory it cannot reach is refused rather than replaced by an empty cluster.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote, urlsplit

import asyncpg

log = logging.getLogger(__name__)

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "MissingBinaryError",
    "ServiceStartError",
    "Services",
    "create_database",
    "default_data_dir",
    "drop_database",
    "ensure_services",
    "find_pg_bin",
    "find_redis_server",
    "free_port",
    "start_services",
]

REDIS_READY_TIMEOUT = 10.0
PG_READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
INITDB_TIMEOUT = 120.0
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107


class MissingBinaryError(RuntimeError):
    """A server program is not installed."""


class ServiceStartError(RuntimeError):
    """A server did not start or did not become ready in time."""


# --- binaries -------------------------------------------------------------------------------------


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<major>/bin: sort numerically so that 16 comes before 9.6.
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))


def _pg_bin_dirs() -> list[Path]:
    dirs: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            dirs.append(Path(out))
    # Debian keeps server binaries off PATH in a directory per major version; on Debian
    # `pg_config` comes from libpq-dev and may name a version whose server is not installed,
    # hence this second look.
    dirs.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True))
    return dirs


def find_pg_bin(name: str) -> Path:
    """Path of a PostgreSQL program (`postgres`, `initdb`, `pg_isready`, ...).

    Looks in `pg_config --bindir`, then /usr/lib/postgresql/<version>/bin newest first, then PATH.
    """
    dirs = _pg_bin_dirs()
    for directory in dirs:
        candidate = directory / name
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    looked = ", ".join(str(d) for d in dirs) or "(no PostgreSQL directories)"
    raise MissingBinaryError(
        f"PostgreSQL program {name!r} not found (looked in {looked} and PATH). Install the "
        "Debian package `postgresql` (sudo apt-get install postgresql, or run scripts/setup.sh)"
        ", or set DATABASE_URL to an existing server."
    )


def find_redis_server() -> Path:
    """Path of `redis-server` (PATH, then /usr/bin and /usr/sbin)."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    for candidate in (Path("/usr/bin/redis-server"), Path("/usr/sbin/redis-server")):
        if os.access(candidate, os.X_OK):
            return candidate
    raise MissingBinaryError(
        "redis-server not found on PATH. Install the Debian package `redis-server` "
        "(sudo apt-get install redis-server, or run scripts/setup.sh), or set REDIS_URL to an "
        "existing server."
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    The socket is closed before the server binds the port, so another process could take it in
    between; on loopback with ephemeral ports that race is rare enough for dev and tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def default_data_dir() -> Path:
    """`<repo>/.streamgate` for a source checkout (it is in .gitignore), else `./.streamgate`."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".streamgate"
    return Path.cwd() / ".streamgate"


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"last lines of {path}:\n{tail}" if tail else f"({path} is empty)"


# --- child process management ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Account:
    """The unprivileged account PostgreSQL runs as when we are root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def from_uid(cls, uid: int, gid: int) -> _Account:
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:  # a uid without a passwd entry (bind-mounted volumes)
            return cls(str(uid), uid, gid, (gid,))
        return cls(entry.pw_name, uid, entry.pw_gid, tuple(os.getgrouplist(entry.pw_name, gid)))

    @classmethod
    def default(cls) -> _Account:
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return cls.from_uid(entry.pw_uid, entry.pw_gid)
        raise ServiceStartError(
            "running as root, and PostgreSQL refuses to run as root, but neither a `postgres` "
            "nor a `nobody` account exists to run it as"
        )

    def popen_kwargs(self) -> dict[str, Any]:
        # extra_groups is explicit so that the child does not keep root's supplementary groups.
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}


class _ChildServer:
    """Shared lifecycle of a server run as our child process."""

    _kind = "server"

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = free_port() if port == 0 else port
        # True when start() found a server already answering on the port and left it alone.
        self.reused = False
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether a server process started by this object is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the server we started, if any; it leads its own process group (pgid = pid)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(
        self, argv: list[str], log_path: Path, *, cwd: Path, account: _Account | None
    ) -> None:
        with log_path.open("ab") as log_file:
            if account is not None:
                os.chown(log_path, account.uid, account.gid)
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                # Own session: a Ctrl-C in the terminal reaches streamgate only, which stops
                # the servers itself once it has shut down (after flushing to Postgres).
                start_new_session=True,
                **(account.popen_kwargs() if account is not None else {}),
            )
        # Safety net for a normal interpreter exit without stop(); not run on SIGKILL.
        atexit.register(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        try:
            self.stop()
        except Exception:
            log.exception("stopping %s at exit", self._kind)

    def _wait_ready(self, is_ready: Callable[[], bool], timeout: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self._proc
            assert proc is not None
            # Exit first: a probe can take seconds against a port squatted by something else.
            code = proc.poll()
            if code is None and is_ready():
                return
            if code is not None:
                self._reap()
                raise ServiceStartError(
                    f"{self._kind} on port {self.port} exited with status {code} during startup; "
                    f"{_log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                self._reap(kill=True)
                raise ServiceStartError(
                    f"{self._kind} on port {self.port} not ready after {timeout:.0f} s (killed); "
                    f"{_log_tail(log_path)}"
                )
            time.sleep(0.05)

    def _terminate(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        if not self._wait_exit(timeout):
            log.warning(
                "%s pid %d ignored %s for %.0f s; killing it",
                self._kind,
                proc.pid,
                sig.name,
                timeout,
            )
        self._reap(kill=True)

    def _wait_exit(self, timeout: float) -> bool:
        """Wait for the server to exit WITHOUT reaping it (see _reap)."""
        proc = self._proc
        assert proc is not None
        if proc.returncode is not None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # already reaped by someone
                return True
            if info is not None:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def _reap(self, *, kill: bool = False) -> None:
        """Reap the server; with kill=True, first SIGKILL it and everything it started.

        Killing goes by parentage as well as by process group because PostgreSQL backends call
        setsid() and so leave the postmaster's group. The server is frozen (SIGSTOP) while we
        collect its descendants so that it cannot fork more, and they are killed before it:
        until it dies they stay its (zombie) children, so no PID we signal can have been reused
        by an unrelated process. The same goes for the group id, the server's own PID.
        """
        proc = self._proc
        if proc is None:
            return
        victims: list[int] = []
        if kill and proc.returncode is None:
            _signal(proc.pid, signal.SIGSTOP)
            victims = _descendants(proc.pid)
            for pid in victims:
                _signal(pid, signal.SIGKILL)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _signal(proc.pid, signal.SIGKILL)
        proc.wait()
        # A restart right away must not find the old backends still attached to the old shared
        # memory ("pre-existing shared memory block is still in use").
        _wait_gone(victims, timeout=5.0)
        self._proc = None
        atexit.unregister(self._stop_at_exit)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _proc_stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after "pid (comm)": [state, ppid, pgrp, ...]; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _descendants(root: int) -> list[int]:
    """PIDs of all descendants of `root` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        fields = _proc_stat(name)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    todo = [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while (fields := _proc_stat(pid)) is not None and fields[0] != "Z":
            if time.monotonic() > deadline:
                log.warning("pid %d still exiting after SIGKILL", pid)
                return
            time.sleep(0.01)


# --- Redis ----------------------------------------------------------------------------------------


def _redis_ping(port: int, timeout: float = 0.5) -> bool:
    # A raw RESP PING keeps start() synchronous and free of a client library; inline commands
    # are part of the protocol.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"+PONG")


class EmbeddedRedis(_ChildServer):
    """A throwaway Redis on 127.0.0.1:port: no persistence, no eviction.

    Nothing is saved to disk (`--save "" --appendonly no`), so a restart loses all data, which
    is what the fault tests simulate. `noeviction` makes a full Redis fail writes loudly instead
    of silently dropping keys (session state, rate-limit counters). Port 0 picks a free port.
    """

    _kind = "redis-server"

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        super().__init__(data_dir, port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self) -> None:
        """Start redis-server, or reuse one already answering PING on the port."""
        if self.running:
            return
        if _redis_ping(self.port):
            self.reused = True
            log.info("reusing the Redis already running on 127.0.0.1:%d", self.port)
            return
        self.reused = False
        binary = find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
        ]  # fmt: skip
        started = time.monotonic()
        self._spawn(argv, self.log_path, cwd=self.data_dir, account=None)
        self._wait_ready(lambda: _redis_ping(self.port), REDIS_READY_TIMEOUT, self.log_path)
        log.info(
            "started Redis on 127.0.0.1:%d in %.2f s (log: %s)",
            self.port,
            time.monotonic() - started,
            self.log_path,
        )

    def stop(self) -> None:
        """Stop the Redis we started (SIGTERM; SIGKILL after 30 s). A reused one is left alone."""
        self._terminate(signal.SIGTERM, STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL the Redis we started (a crash)."""
        self._reap(kill=True)

    def restart(self) -> None:
        """Stop and start again on the same port: all data is lost."""
        if self.reused:
            raise RuntimeError(f"Redis on port {self.port} was not started by us; not restarting")
        self.stop()
        self.start()


# --- PostgreSQL -----------------------------------------------------------------------------------

_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,  # wait for clients to disconnect
    "fast": signal.SIGINT,  # abort transactions, disconnect clients, clean shutdown
    "immediate": signal.SIGQUIT,  # no shutdown checkpoint; crash recovery on next start
}


def _pg_isready(binary: Path, port: int) -> int:
    """pg_isready's status: 0 accepting, 1 rejecting (starting/stopping), 2 no response."""
    try:
        return subprocess.run(
            [str(binary), "-h", "127.0.0.1", "-p", str(port), "-t", "1", "-q"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=5,
        ).returncode
    except subprocess.TimeoutExpired:
        return 2


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _dsn_with_database(dsn: str, name: str) -> str:
    return urlsplit(dsn)._replace(path="/" + quote(name, safe="")).geturl()


async def create_database(admin_dsn: str, name: str, *, exist_ok: bool = False) -> str:
    """CREATE DATABASE `name` on the server of `admin_dsn`; returns the new database's DSN."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
    except asyncpg.DuplicateDatabaseError:
        if not exist_ok:
            raise
    finally:
        await conn.close()
    return _dsn_with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, name: str) -> None:
    """DROP DATABASE IF EXISTS, disconnecting its clients first (WITH (FORCE), PostgreSQL 13+)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


def _owner_account(path: Path) -> _Account | None:
    """The account owning an existing, non-root-owned directory (a cluster made earlier)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if st.st_uid == 0:
        return None
    return _Account.from_uid(st.st_uid, st.st_gid)


def _can_enter(path: Path, account: _Account) -> bool:
    """Whether `account` can traverse every directory down to and including `path`."""
    test = shutil.which("test") or "/usr/bin/test"
    # Asking the kernel as that account is the only check that also honours ACLs.
    result = subprocess.run(
        [test, "-x", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        timeout=10,
        **account.popen_kwargs(),
    )
    return result.returncode == 0


class EmbeddedPostgres(_ChildServer):
    """A development/test PostgreSQL cluster in `data_dir` on 127.0.0.1:port.

    Durability is switched off (fsync, synchronous_commit, full_page_writes). stop()/start()
    keeps all committed data. kill()/start() keeps all but the last fraction of a second of
    commits: with synchronous_commit=off the WAL writer hands commits to the kernel up to ~0.6 s
    later (a test that needs a commit to survive kill() commits it with `SET LOCAL
    synchronous_commit = on`). An OS crash can lose anything.
    Authentication is `trust` for the `postgres` superuser, listening on loopback only. The Unix
    socket lives in the cluster directory, not /var/run/postgresql (not writable by users, and
    would clash with a system server). Port 0 picks a free port.
    """

    _kind = "postgres"

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        super().__init__(data_dir, port)
        self._pgdata: Path | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pgdata(self) -> Path:
        """The cluster directory: `data_dir`, unless relocated for root (see module docstring).

        Known once start() has started a server (not when it reused one).
        """
        if self._pgdata is None:
            raise RuntimeError("pgdata is known only after start() started a server")
        return self._pgdata

    @property
    def relocated(self) -> bool:
        return self._pgdata is not None and self._pgdata != self.data_dir

    @property
    def log_path(self) -> Path:
        return self.pgdata / "postgres.log"

    def start(self) -> None:
        """Start PostgreSQL (running initdb first on an empty directory), or reuse one already
        answering on the port."""
        if self.running:
            return
        isready = find_pg_bin("pg_isready")
        if _pg_isready(isready, self.port) in (0, 1) and self._wait_reused(isready):
            return
        self.reused = False
        postgres = find_pg_bin("postgres")
        # initdb must match the server's version: take it from the same directory when there.
        initdb = postgres.parent / "initdb"
        if not os.access(initdb, os.X_OK):
            initdb = find_pg_bin("initdb")
        pgdata, account = self._prepare_pgdata()
        if not (pgdata / "PG_VERSION").exists():
            if any(pgdata.iterdir()):
                raise ServiceStartError(
                    f"{pgdata} is neither empty nor a PostgreSQL cluster; not touching it"
                )
            self._initdb(initdb, pgdata, account)
        # Only now is it a cluster of ours: destroy() deletes _pgdata, never a foreign directory.
        self._pgdata = pgdata
        socket_dir = str(pgdata)
        if len(f"{pgdata}/.s.PGSQL.{self.port}".encode()) > _MAX_UNIX_SOCKET_PATH:
            # Too long for a Unix socket path; we connect over TCP, so go without one.
            socket_dir = ""
        argv = [
            str(postgres),
            "-D", str(pgdata),
            "-p", str(self.port),
            "-k", socket_dir,
            "-c", "listen_addresses=127.0.0.1",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            # Shows in every process title ("postgres: streamgate-5440: checkpointer"): tells
            # our servers from a system one in ps, and finds their backends (`pgrep -f`).
            "-c", f"cluster_name=streamgate-{self.port}",
        ]  # fmt: skip
        started = time.monotonic()
        self._spawn(argv, self.log_path, cwd=pgdata, account=account)
        self._wait_ready(
            lambda: _pg_isready(isready, self.port) == 0, PG_READY_TIMEOUT, self.log_path
        )
        log.info(
            "started PostgreSQL on 127.0.0.1:%d in %.2f s (cluster: %s)",
            self.port,
            time.monotonic() - started,
            pgdata,
        )

    def _wait_reused(self, isready: Path) -> bool:
        """Reuse the server on the port once it accepts connections; False if it went away."""
        deadline = time.monotonic() + PG_READY_TIMEOUT
        # 1 = a server starting up or shutting down: give it the startup timeout to decide.
        while (status := _pg_isready(isready, self.port)) == 1:
            if time.monotonic() > deadline:
                raise ServiceStartError(
                    f"the PostgreSQL on port {self.port} is not accepting connections"
                )
            time.sleep(0.1)
        if status != 0:
            return False  # it was shutting down: the port is ours to use
        self.reused = True
        log.info("reusing the PostgreSQL already running on 127.0.0.1:%d", self.port)
        return True

    def _prepare_pgdata(self) -> tuple[Path, _Account | None]:
        """Create the cluster directory, owned by the account postgres will run as."""
        if os.geteuid() != 0:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            return self.data_dir, None
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        account = _owner_account(self.data_dir) or _Account.default()
        if _can_enter(self.data_dir.parent, account):
            pgdata = self.data_dir
        else:
            if any(self.data_dir.iterdir()):
                # Maybe a cluster from a run as another user: never silently start an empty
                # one elsewhere instead of it.
                raise ServiceStartError(
                    f"{self.data_dir} is not empty, and the {account.name!r} account "
                    "PostgreSQL runs as (we are root) cannot reach it: give that account "
                    "access to its parent directories, or use another directory"
                )
            digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:16]
            pgdata = Path(tempfile.gettempdir()) / f"streamgate-pg-{digest}"
            log.warning(
                "%s is not reachable by the %r account PostgreSQL runs as (we are root); "
                "keeping the cluster in %s instead",
                self.data_dir,
                account.name,
                pgdata,
            )
            account = _owner_account(pgdata) or account
            try:
                pgdata.mkdir(mode=0o700)
            except FileExistsError:
                # The temp dir is world-writable: refuse anything we would not have made.
                if pgdata.is_symlink() or not pgdata.is_dir():
                    raise ServiceStartError(f"{pgdata} exists and is not a directory") from None
        st = pgdata.lstat()
        if st.st_uid != account.uid:
            # Only ever an empty directory we just made, or a cluster of another owner that
            # we take over (chown -R), e.g. one made by root-less runs before.
            for root, dirs, files in os.walk(pgdata):
                for entry in (*dirs, *files):
                    os.lchown(os.path.join(root, entry), account.uid, account.gid)
            os.chown(pgdata, account.uid, account.gid)
        os.chmod(pgdata, 0o700)
        return pgdata, account

    def _initdb(self, initdb: Path, pgdata: Path, account: _Account | None) -> None:
        started = time.monotonic()
        result = subprocess.run(
            [
                str(initdb), "-D", str(pgdata), "-A", "trust", "-U", "postgres",
                # --no-sync: dev/test cluster, see the module docstring. --no-locale (C):
                # does not depend on which locales the machine has generated.
                "--no-sync", "-E", "UTF8", "--no-locale",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=pgdata,
            timeout=INITDB_TIMEOUT,
            **(account.popen_kwargs() if account is not None else {}),
        )  # fmt: skip
        if result.returncode != 0:
            output = "\n".join(result.stdout.decode(errors="replace").splitlines()[-25:])
            raise ServiceStartError(f"initdb {pgdata} failed ({result.returncode}):\n{output}")
        log.info("initdb %s in %.2f s", pgdata, time.monotonic() - started)

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Shut down the PostgreSQL we started (SIGKILL after 30 s). A reused one is left alone.

        `fast` (the default) rolls back open transactions and disconnects clients.
        start() works again afterwards on the same cluster.
        """
        self._terminate(_STOP_SIGNALS[mode], STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL the postmaster and all its backends at once (a crash).

        start() works again afterwards; PostgreSQL runs crash recovery from its WAL (losing
        commits of the last ~0.6 s, see the class docstring).
        """
        self._reap(kill=True)

    def destroy(self) -> None:
        """stop(), then delete the cluster directory; a relocated cluster's log is copied into
        data_dir first, so that it survives for debugging."""
        self.stop()
        pgdata = self._pgdata
        if pgdata is None:
            return
        if self.relocated and (pgdata / "postgres.log").exists():
            shutil.copyfile(pgdata / "postgres.log", self.data_dir / "postgres.log")
        shutil.rmtree(pgdata, ignore_errors=True)
        self._pgdata = None

    async def create_database(self, name: str, *, exist_ok: bool = False) -> str:
        """CREATE DATABASE `name`; returns its DSN."""
        return await create_database(self.url, name, exist_ok=exist_ok)

    async def drop_database(self, name: str) -> None:
        await drop_database(self.url, name)


# --- both -----------------------------------------------------------------------------------------


@dataclass
class Services:
    """URLs of the Redis and PostgreSQL to use, and the embedded servers behind them, if any.

    `redis` / `postgres` are None for a server configured from outside (a URL): fault tests
    that restart or kill a server skip themselves then.
    """

    redis_url: str
    database_url: str
    redis: EmbeddedRedis | None = None
    postgres: EmbeddedPostgres | None = None
    # Delete the PostgreSQL cluster on stop() (throwaway test clusters).
    discard_data: bool = False

    def stop(self) -> None:
        """Stop the servers we started (reused and external ones keep running). Idempotent."""
        errors: list[Exception] = []
        if self.redis is not None:
            try:
                self.redis.stop()
            except Exception as exc:
                errors.append(exc)
        if self.postgres is not None:
            try:
                if self.discard_data:
                    self.postgres.destroy()
                else:
                    self.postgres.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise ExceptionGroup("stopping embedded services", errors)


def start_services(
    data_dir: Path | None = None,
    *,
    redis_port: int = 6390,
    pg_port: int = 5440,
    redis_url: str | None = None,
    database_url: str | None = None,
    discard_data: bool = False,
) -> Services:
    """Blocking core of ensure_services(): start or reuse whichever server has no URL."""
    root = data_dir if data_dir is not None else default_data_dir()
    redis: EmbeddedRedis | None = None
    postgres: EmbeddedPostgres | None = None
    try:
        if redis_url is None:
            redis = EmbeddedRedis(root / "redis", redis_port)
            redis.start()
            redis_url = redis.url
        if database_url is None:
            postgres = EmbeddedPostgres(root / "postgres", pg_port)
            postgres.start()
            database_url = postgres.url
    except BaseException:
        # Do not leave the first server running when the second one fails.
        if redis is not None:
            redis.stop()
        if postgres is not None:
            postgres.stop()
        raise
    return Services(redis_url, database_url, redis, postgres, discard_data)


async def ensure_services(
    data_dir: Path | None = None,
    *,
    redis_port: int = 6390,
    pg_port: int = 5440,
    redis_url: str | None = None,
    database_url: str | None = None,
) -> Services:
    """Redis and PostgreSQL for `streamgate serve` when REDIS_URL / DATABASE_URL are not set.

    Starts (or reuses, if one already answers on the port) an embedded Redis and PostgreSQL with
    their data in `data_dir` (default `<repo>/.streamgate/`: `redis/`, `postgres/`). A URL that
    is passed is used as is and that server is not started. The default ports stay clear of a
    system Redis/PostgreSQL on 6379/5432; 0 picks free ports.

    Lifetime: the servers are child processes of the streamgate process. Call `Services.stop()`
    when the server exits (after its own shutdown has flushed to Postgres); as a safety net, a
    normal interpreter exit stops them too (atexit). Only servers started here are stopped. If
    streamgate is SIGKILLed they keep running, and the next `ensure_services` reuses them (and
    then, not having started them, does not stop them).

    The PostgreSQL runs with durability off: development and tests only.
    """
    # Startup blocks for up to a few seconds (initdb, waiting for readiness): off the loop.
    return await asyncio.to_thread(
        start_services,
        data_dir,
        redis_port=redis_port,
        pg_port=pg_port,
        redis_url=redis_url,
        database_url=database_url,
    )
