"""Where an active phone call's memory goes: `python -m loadtest.call_rss`.

Issue 15 target 3 is <= 100 KiB of RSS per active Twilio call, read the way `make bench`
reads it (loadtest/bench.py, loadtest/twilio_calls.py): the server's VmRSS growth from before
the first call to N calls, over N. This starts the same server the bench's telephony phase
starts (bench.write_config's telephony config: billing on, embedded Redis and PostgreSQL, the
bench tenant made and funded through the admin API, every call keyed, admitted, leased and
metered; the full call path: VAD, ASR, agent, TTS, marks), through loadtest/server_rss.py (the
server's own CLI with a memory probe inside), and places calls with the bench's generator
(twilio_calls.CallSearch: TwilioCall, the ramp, RealtimePacer). For each count of --calls
(cumulative: 100 then 200 adds 100 more calls to the 100 still up) it waits until the calls
have lived as long as the bench's calls have when it reads RSS (ramp + warm-up + window:
5 + 3 + 10 s), then reports:

- VmRSS growth per call from the base (before the first call) and, between two counts, the
  marginal growth per added call (the part a fixed one-off cost does not blur);
- /proc/<pid>/smaps grouped: [heap] (glibc's main arena), 1 MiB anonymous maps (pymalloc's
  arenas), other anonymous maps (glibc's mmap'd chunks, numpy, thread arenas), thread
  stacks, file-backed pages (shared libraries' code touched);
- with --probe (SIGUSR2 to the server: loadtest/server_rss.py): glibc's malloc_info (bytes
  each arena has from the system and keeps free), pymalloc's arenas, live objects by type,
  threads and tasks; with --tracemalloc N also the top allocation sites (by line) of what
  the calls added, diffed between snapshots. The probe's own allocations land in the
  allocators between counts, and tracemalloc costs memory: the RSS headline is from a run
  without --probe.

Every call hangs up at the end and the server is stopped (SIGTERM: it drains and stops its
Redis and PostgreSQL). Keep the counts below CPU saturation (the bench kept up with ~250 on
one core); a run of `--calls 100,200` takes ~1.5 min, most of it the stores' start.

    python -m loadtest.call_rss [--calls 100,200] [--probe] [--tracemalloc 25]
        [--allocator arena_max=2,...] [--cpu 0 --gen-cpu 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.bench import (
    HOST,
    TELEPHONY_RUN,
    LiveServer,
    ServerProcess,
    http_get,
    start_server,
    write_config,
)
from loadtest.loadgen import _OPEN, Target
from loadtest.pin import raise_nofile_limit
from loadtest.twilio_calls import (
    MAX_LAG_P99_MS,
    TWILIO_PATH,
    CallSearch,
    ServerCounters,
    streamgate_counters,
)

# How long the bench's calls have lived when it reads RSS: the ramp, the warm-up, the window.
BENCH_RAMP_S = 5.0
BENCH_CALL_AGE_S = 5.0 + 3.0 + 10.0
PYMALLOC_ARENA_KB = 1024  # Python 3.10+ on 64-bit: 1 MiB arenas, each its own mmap
DUMP_TIMEOUT_S = 30.0


# --- /proc ---------------------------------------------------------------------------------------


@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    name: str
    rss_kb: int = 0
    anon_kb: int = 0

    @property
    def size_kb(self) -> int:
        return (self.end - self.start) // 1024


def read_smaps(pid: int) -> list[Mapping]:
    maps: list[Mapping] = []
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                lo, hi = head[0].split("-")
                maps.append(Mapping(int(lo, 16), int(hi, 16), head[1],
                                    head[5].strip() if len(head) > 5 else ""))
            elif head[0] == "Rss:" and maps:
                maps[-1].rss_kb = int(head[1])
            elif head[0] == "Anonymous:" and maps:
                maps[-1].anon_kb = int(head[1])
    return maps


def group_smaps(maps: list[Mapping]) -> dict[str, int]:
    """RSS (KiB) by kind of mapping. A glibc thread arena is a 64 MiB-aligned reservation
    whose used part is rw-p and the rest ---p: an anonymous rw-p map directly followed by a
    ---p map of the same reservation is counted as one."""
    out: Counter[str] = Counter()
    for i, m in enumerate(maps):
        name = m.name
        if name == "[heap]":
            kind = "[heap] (glibc main arena)"
        elif name.startswith("[stack"):
            kind = "[stack]"
        elif name in ("[vdso]", "[vvar]", "[vsyscall]"):
            kind = "kernel"
        elif name == "":
            nxt = maps[i + 1] if i + 1 < len(maps) else None
            if m.size_kb == PYMALLOC_ARENA_KB and "rw" in m.perms:
                kind = "anon 1 MiB (pymalloc arenas)"
            elif (nxt is not None and nxt.start == m.end and nxt.name == ""
                  and nxt.perms.startswith("---")
                  and (m.size_kb + nxt.size_kb) % (64 * 1024) == 0):
                kind = "anon thread arena or stack"
            elif "rw" in m.perms:
                kind = "anon other (mmap'd chunks, numpy, ...)"
            else:
                kind = "anon guard"
        else:
            kind = "file: " + os.path.basename(name)
        out[kind] += m.rss_kb
    return dict(out)


def status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            parts = value.split()
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Threads") and parts:
                out[key] = int(parts[0])
    return out


# --- the server ----------------------------------------------------------------------------------


class ProbedServer(ServerProcess):
    """The bench's server process, started through loadtest/server_rss.py with its env."""

    def __init__(self, argv: list[str], cpu: int | None, workdir: Path, gen_cpu: int | None,
                 extra_env: dict[str, str]) -> None:
        super().__init__(TELEPHONY_RUN, argv, cpu, workdir, gen_cpu)
        self.extra_env = extra_env

    def _spawn(self, env: dict[str, str]) -> None:
        super()._spawn({**env, **self.extra_env})


async def probe_dump(server: ServerProcess, dump_dir: Path, n: int) -> dict[str, Any]:
    done = dump_dir / f"dump-{n}.done"
    os.kill(server.pid, signal.SIGUSR2)
    deadline = time.monotonic() + DUMP_TIMEOUT_S
    while not done.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server wrote no dump {n} in {DUMP_TIMEOUT_S:g} s")
        await asyncio.sleep(0.1)
    data: dict[str, Any] = json.loads((dump_dir / f"dump-{n}.json").read_text())
    return data


# --- one level -----------------------------------------------------------------------------------


@dataclass
class Level:
    calls: int  # asked
    opened: int
    status: dict[str, int]
    smaps: dict[str, int]
    cpu_pct: float = 0.0
    accepted_ms: float | None = None
    dropped_ms: float | None = None
    dump: dict[str, Any] | None = None
    dump_no: int = 0
    notes: list[str] = field(default_factory=list)


def diff_kb(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b))}


def per_call(kb: float, calls: int) -> str:
    return f"{kb / calls:7.1f}" if calls else "      -"


def report(levels: list[Level], dump_dir: Path | None, top: int) -> list[str]:
    base = levels[0]
    out = ["", "## RSS growth (KiB) and per call", "",
           "| calls | open | VmRSS MB | growth KiB | KiB/call from base | marginal KiB/call "
           "| RssAnon/call | RssFile/call | server CPU | audio accepted / dropped ms |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    prev = base
    for lv in levels:
        grow = lv.status["VmRSS"] - base.status["VmRSS"]
        marg = lv.status["VmRSS"] - prev.status["VmRSS"]
        out.append(
            f"| {lv.calls} | {lv.opened} | {lv.status['VmRSS'] / 1024:.1f} | {grow:,} | "
            f"{per_call(grow, lv.opened)} | "
            f"{per_call(marg, lv.opened - prev.opened) if lv is not base else '-'} | "
            f"{per_call(lv.status['RssAnon'] - base.status['RssAnon'], lv.opened)} | "
            f"{per_call(lv.status['RssFile'] - base.status['RssFile'], lv.opened)} | "
            f"{lv.cpu_pct:.0f}% | {lv.accepted_ms or 0:,.0f} / {lv.dropped_ms or 0:,.0f} |")
        prev = lv
    out += ["", "## smaps by kind: growth from base, KiB per call (and total KiB)", ""]
    kinds = sorted({k for lv in levels for k in lv.smaps},
                   key=lambda k: -(levels[-1].smaps.get(k, 0) - base.smaps.get(k, 0)))
    out.append("| kind | " + " | ".join(f"{lv.opened} calls" for lv in levels[1:]) + " |")
    out.append("|---|" + "---|" * (len(levels) - 1))
    for k in kinds:
        cells = []
        for lv in levels[1:]:
            d = lv.smaps.get(k, 0) - base.smaps.get(k, 0)
            cells.append(f"{per_call(d, lv.opened).strip()} ({d:,})")
        if any(c != "0.0 (0)" for c in cells):
            out.append(f"| {k} | " + " | ".join(cells) + " |")
    if base.dump is not None:
        out += probe_report(levels, dump_dir, top)
    return out


def _arena_line(info: dict[str, Any]) -> str:
    total = info["total"]
    heaps = info["heaps"]
    return (f"arenas {len(heaps)}, from the system {total.get('system_current', 0) // 1024:,} "
            f"KiB (max {total.get('system_max', 0) // 1024:,}), free inside "
            f"{total.get('free', 0) // 1024:,} KiB, mmap'd chunks "
            f"{total.get('mmap_count', 0)} = {total.get('mmap_bytes', 0) // 1024:,} KiB")


def _in_use(dump: dict[str, Any]) -> tuple[int, int, int, int]:
    """glibc bytes in use and free inside its arenas, pymalloc's bytes in use and arenas."""
    total = (dump.get("malloc_info") or {}).get("total", {})
    system, free = int(total.get("system_current", 0)), int(total.get("free", 0))
    py = dump.get("pymalloc", {})
    return (system - free + int(total.get("mmap_bytes", 0)), free,
            int(py.get("bytes in allocated blocks", 0)), int(py.get("arenas allocated current", 0)))


def probe_report(levels: list[Level], dump_dir: Path | None, top: int) -> list[str]:
    base = levels[0]
    assert base.dump is not None
    out = ["", "## Inside the server (SIGUSR2 probe)", ""]
    for lv in levels:
        d = lv.dump
        if d is None:
            continue
        mi = d.get("malloc_info")
        py = d.get("pymalloc", {})
        arenas = py.get("arenas allocated current", 0)
        out.append(f"- {lv.opened} calls: glibc: " + (_arena_line(mi) if mi else "n/a")
                   + f"; pymalloc arenas {arenas} (blocks in use "
                   f"{py.get('bytes in allocated blocks', 0) // 1024:,} KiB, free in arenas "
                   f"{(py.get('bytes in available blocks', 0) + py.get('bytes in unused pools', 0)) // 1024:,} KiB)"  # noqa: E501
                   + f"; threads {len(d.get('threads', []))}; tasks {d.get('tasks')}; "
                   f"gc objects {d.get('gc_objects')}"
                   + (f"; tracemalloc {d['tracemalloc']['current'] // 1024:,} KiB"
                      if "tracemalloc" in d else ""))
        if mi:
            for h in mi["heaps"]:
                out.append(f"  - arena {h['nr']}: system {h.get('system_current', 0) // 1024:,}"
                           f" KiB, free {h.get('free', 0) // 1024:,} KiB")
    out += ["", "Per call, from the base (KiB): memory in use is steadier than RSS, which also "
            "holds the allocators' high-water marks:", "",
            "| calls | glibc in use | glibc free, held | pymalloc blocks in use "
            "| pymalloc arenas |",
            "|---|---|---|---|---|"]
    b_in, b_free, b_py, b_ar = _in_use(base.dump)
    for lv in levels[1:]:
        if lv.dump is None or not lv.opened:
            continue
        g_in, g_free, py, ar = _in_use(lv.dump)
        n = lv.opened
        out.append(f"| {n} | {(g_in - b_in) / 1024 / n:.1f} | {(g_free - b_free) / 1024 / n:.1f}"
                   f" | {(py - b_py) / 1024 / n:.1f} | {(ar - b_ar) * PYMALLOC_ARENA_KB / n:.1f} |")
    last = levels[-1]
    if last.dump is not None and last is not base:
        before = dict(map(tuple, base.dump["objects_by_type"]))
        after = dict(map(tuple, last.dump["objects_by_type"]))
        grown = sorted(((after[k] - before.get(k, 0), k) for k in after), reverse=True)[:top]
        out += ["", f"Live objects added by {last.opened} calls (per call):", ""]
        out += [f"- {k}: {n:,} ({n / max(last.opened, 1):.1f})" for n, k in grown if n > 0]
        if "untracked" in last.dump and "untracked" in base.dump:
            b0 = {k: (n, sz) for k, n, sz in base.dump["untracked"]}
            rows = [(sz - b0.get(k, (0, 0))[1], n - b0.get(k, (0, 0))[0], k)
                    for k, n, sz in last.dump["untracked"]]
            out += ["", f"Untracked objects (C types, bytes, arrays) reachable, added by "
                    f"{last.opened} calls (per call: count, KiB):", ""]
            out += [f"- {k}: {n / max(last.opened, 1):.1f}, {sz / 1024 / max(last.opened, 1):.1f}"
                    for sz, n, k in sorted(rows, reverse=True) if n > 0]
        if "buffers" in last.dump and "buffers" in base.dump:
            b1 = {k: (n, sz) for k, n, sz in base.dump["buffers"]}
            rows = [(sz - b1.get(k, (0, 0))[1], n - b1.get(k, (0, 0))[0], k)
                    for k, n, sz in last.dump["buffers"]]
            out += ["", f"Buffers of >= 512 bytes by holder, added by {last.opened} calls "
                    "(per call: count, KiB):", ""]
            out += [f"- {k}: {n / max(last.opened, 1):.1f}, {sz / 1024 / max(last.opened, 1):.1f}"
                    for sz, n, k in sorted(rows, reverse=True) if sz > 0]
    if dump_dir is not None:
        out += tracemalloc_report(levels, dump_dir, top)
    return out


def tracemalloc_report(levels: list[Level], dump_dir: Path, top: int) -> list[str]:
    base, last = levels[0], levels[-1]
    a = dump_dir / f"dump-{base.dump_no}.tracemalloc"
    b = dump_dir / f"dump-{last.dump_no}.tracemalloc"
    if last is base or not a.exists() or not b.exists():
        return []
    old, new = tracemalloc.Snapshot.load(str(a)), tracemalloc.Snapshot.load(str(b))
    filt = [tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>")]
    old, new = old.filter_traces(filt), new.filter_traces(filt)
    n = last.opened
    out: list[str] = []
    for key in ("filename", "lineno"):
        stats = new.compare_to(old, key)
        total = sum(s.size_diff for s in stats)
        out += ["", f"tracemalloc, growth by {key} over {n} calls: total {total / 1024:,.0f} KiB "
                f"= {total / 1024 / max(n, 1):.1f} KiB per call", "",
                "| KiB per call | blocks per call | where |", "|---|---|---|"]
        for s in stats[:top]:
            frame = s.traceback[0]
            where = (frame.filename.replace(str(Path.cwd()) + "/", "")
                     + ("" if key == "filename" else f":{frame.lineno}"))
            out.append(f"| {s.size_diff / 1024 / max(n, 1):.2f} | {s.count_diff / max(n, 1):.1f}"
                       f" | {where} |")
    # Whole tracebacks of the largest sites: who asked for the memory.
    stats = new.compare_to(old, "traceback")[:min(top, 8)]
    out += ["", "Largest sites with their callers:", ""]
    for s in stats:
        out.append(f"- {s.size_diff / 1024 / max(n, 1):.2f} KiB per call, {s.count_diff} blocks:")
        for frame in list(s.traceback)[::-1][:6]:  # the most recent first
            out.append(f"    {frame.filename.replace(str(Path.cwd()) + '/', '')}:{frame.lineno}")
    return out


# --- the run -------------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, workdir: Path) -> list[str]:
    ns = argparse.Namespace(connections=0, idle_sessions=0, rt_max=0,
                            calls_max=max(args.calls) + 100, batch=100)
    config, token = write_config(workdir, TELEPHONY_RUN, ns)
    dump_dir = workdir / "dumps"
    dump_dir.mkdir()
    env = {"STREAMGATE_RSS_DUMP_DIR": str(dump_dir)}
    if args.tracemalloc:
        env["STREAMGATE_RSS_TRACEMALLOC"] = str(args.tracemalloc)
    if args.allocator:
        env["STREAMGATE_RSS_ALLOCATOR"] = args.allocator
    env.update(dict(kv.split("=", 1) for kv in args.env))
    argv = [sys.executable, "-m", "loadtest.server_rss", "serve", "--config", str(config),
            "--host", HOST, "--ws-port", "0", "--http-port", "0", "--workers", "1"]
    server = ProbedServer(argv, args.cpu, workdir, args.gen_cpu, env)
    if args.gen_cpu is not None:
        os.sched_setaffinity(0, {args.gen_cpu})
    dumps = 0
    levels: list[Level] = []
    lines: list[str] = []
    try:
        live: LiveServer = await start_server(server, config, token, ns)
        assert live.admin is not None

        async def view() -> ServerCounters:
            assert live.admin is not None
            return streamgate_counters(await http_get(live.admin.http_port, "/metrics"))

        search = CallSearch("streamgate", Target(HOST, live.ws_port, TWILIO_PATH, "credit"),
                            live.api_key, server, view, lag_limit_ms=MAX_LAG_P99_MS,
                            lag_what="", ramp_s=args.ramp, batch=100)
        await asyncio.sleep(args.settle)
        base = Level(0, 0, status(server.pid), group_smaps(read_smaps(server.pid)))
        if args.probe:
            dumps += 1
            base.dump, base.dump_no = await probe_dump(server, dump_dir, dumps), dumps
        levels.append(base)
        view0 = await view()
        print(f"call_rss: base VmRSS {base.status['VmRSS'] / 1024:.1f} MB", flush=True)
        pacing = asyncio.ensure_future(search.pacer.run(time.perf_counter() + 0.05))
        try:
            for n in args.calls:
                add = n - len(search.clients)
                started = time.perf_counter()
                await search.grow(add)
                # The newest calls live as long as the bench's do when it reads RSS.
                await asyncio.sleep(max(0.0, started + args.age - time.perf_counter()
                                        - args.window))
                s0 = server.sample()
                t0 = time.perf_counter()
                await asyncio.sleep(args.window)
                s1 = server.sample()
                elapsed = time.perf_counter() - t0
                lv = Level(n, sum(1 for c in search.clients if c.state == _OPEN and not c.closing),
                           status(server.pid), group_smaps(read_smaps(server.pid)))
                srv = s1 - s0
                lv.cpu_pct = 100.0 * (srv.user_s + srv.sys_s) / elapsed
                try:
                    v = await view()
                except (OSError, TimeoutError) as exc:  # a saturated server (tracemalloc)
                    lv.notes.append(f"/metrics: {type(exc).__name__}")
                else:
                    if v.accepted_ms is not None and view0.accepted_ms is not None:
                        lv.accepted_ms = v.accepted_ms - view0.accepted_ms
                    if v.dropped_ms is not None and view0.dropped_ms is not None:
                        lv.dropped_ms = v.dropped_ms - view0.dropped_ms
                if args.probe:
                    dumps += 1
                    lv.dump, lv.dump_no = await probe_dump(server, dump_dir, dumps), dumps
                calls = search.gen.calls
                if search.gen.connect_failures or calls.server_closes or calls.dropped:
                    lv.notes.append(f"connect failures {dict(search.gen.connect_failures)}, "
                                    f"server closes {dict(calls.server_closes)}, "
                                    f"dropped {calls.dropped}")
                levels.append(lv)
                grow = lv.status["VmRSS"] - base.status["VmRSS"]
                print(f"call_rss: {lv.opened} calls open: VmRSS {lv.status['VmRSS'] / 1024:.1f}"
                      f" MB, {grow / max(lv.opened, 1):.1f} KiB per call, server CPU "
                      f"{lv.cpu_pct:.0f}%" + "".join(f"; {n}" for n in lv.notes), flush=True)
        finally:
            pacing.cancel()
            await search.hang_up_all()
        lines = report(levels, dump_dir if args.tracemalloc else None, args.top)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            for f in dump_dir.iterdir():
                (args.out / f.name).write_bytes(f.read_bytes())
            (args.out / "levels.json").write_text(json.dumps(
                [{"calls": lv.calls, "opened": lv.opened, "status": lv.status,
                  "smaps": lv.smaps, "cpu_pct": lv.cpu_pct} for lv in levels]))
    finally:
        await server.stop()
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                (args.out / "server.stderr.log").write_bytes(server.stderr_path.read_bytes())
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.call_rss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", default="100,200",
                   help="call counts, growing, comma-separated (default: %(default)s)")
    p.add_argument("--ramp", type=float, default=BENCH_RAMP_S,
                   help="a count's new calls connect evenly over this long")
    p.add_argument("--age", type=float, default=BENCH_CALL_AGE_S,
                   help="read RSS when a count's newest calls are this old (the bench's: "
                        "%(default)s s)")
    p.add_argument("--window", type=float, default=5.0,
                   help="server CPU is measured over the last S s before the read")
    p.add_argument("--settle", type=float, default=1.0,
                   help="after the bench's start-up pause, before the base read")
    p.add_argument("--probe", action="store_true",
                   help="dump the server's allocators and objects at each count (SIGUSR2)")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                   help="trace allocations in the server (frames per trace; implies --probe)")
    p.add_argument("--allocator", default="",
                   help="glibc malloc settings for the server, e.g. arena_max=2,"
                        "trim_threshold=131072 (server/infra/allocator.py)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the server (e.g. MALLOC_ARENA_MAX=2)")
    p.add_argument("--cpu", type=int, default=None, help="pin the server to this CPU")
    p.add_argument("--gen-cpu", type=int, default=None, help="pin the generator to this CPU")
    p.add_argument("--top", type=int, default=25, help="rows of each breakdown")
    p.add_argument("--out", type=Path, default=None, help="keep the dumps and levels here")
    args = p.parse_args(argv)
    args.calls = [int(c) for c in args.calls.split(",") if c.strip()]
    if not args.calls or min(args.calls) < 1 or args.calls != sorted(args.calls):
        p.error("--calls: growing counts >= 1")
    if args.tracemalloc:
        args.probe = True
    if any("=" not in kv for kv in args.env):
        p.error("--env NAME=VALUE")
    return args


async def amain(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="streamgate-call-rss-") as tmp:
        os.chmod(tmp, 0o711)  # PostgreSQL (as `postgres`) reaches its data directory in here
        lines = await measure(args, Path(tmp))
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    import uvloop

    args = parse_args(argv)
    if raise_nofile_limit() < max(args.calls) + 256:
        print("call_rss: open-files limit too low; raise `ulimit -n`", file=sys.stderr)
        return 2
    try:
        return uvloop.run(amain(args))
    except KeyboardInterrupt:
        return 130
    finally:
        for server in list(ServerProcess.live):
            server.stop_now()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
