"""Smoke tests of the load tools against a real server: the swarm (ASR and TTS scenarios, a few
seconds each) and a short headless locust run (locust is the `load` extra, which scripts/setup.sh
installs). They check that the tools measure what they claim, not how fast the server is."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ROOT, TEST_KEY, ServerProcess, start_server

pytestmark = pytest.mark.e2e

# Telephony answers with the synthetic TTS model, as in test_telephony_e2e.py.
ENV = {"STREAMGATE_TELEPHONY__TTS_MODEL": "synthetic",
       "STREAMGATE_TELEPHONY__AGENT__KIND": "echo",
       "STREAMGATE_TTS__SESSION__DEFAULT_MODEL": "synthetic"}


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    server = start_server(ENV)
    yield server
    code = server.stop()
    tail = "\n".join(server.stderr_lines[-40:])
    assert code == 0, f"server exited with {code}:\n{tail}"


def run_swarm(srv: ServerProcess, tmp_path: Path, scenario: str) -> dict[str, Any]:
    path = tmp_path / "scenario.toml"
    path.write_text(scenario)
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.swarm", "--scenario", str(path), "--url", srv.ws,
         "--key", TEST_KEY, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=40)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    # matplotlib is in the `load` extra, which scripts/setup.sh installs: the chart is drawn.
    assert "no plot" not in proc.stdout, proc.stdout
    assert (out / "report.png").stat().st_size > 10_000
    return report


def test_swarm_asr_telephony(srv: ServerProcess, tmp_path: Path) -> None:
    r = run_swarm(srv, tmp_path, """
name = "smoke_asr"
kind = "asr"
sessions = 20
ramp_per_s = 100
duration_s = 5
encoding = "mulaw"
sample_rate = 8000
chunk_ms = 20
[params]
vad = "medium"
interim_results = "false"
""")
    s = r["sessions"]
    assert (s["started"], s["completed"], s["errors"]) == (20, 20, 0), s
    assert r["server_errors"] == {}
    # 20 sessions x 50 frames/s for ~5 s, every frame eventually credited.
    assert r["frames"]["sent"] > 20 * 50 * 4
    assert r["frames"]["credited"] > 0.9 * r["frames"]["sent"]
    lat = r["latency_ms"]
    # tests/e2e/server.toml: a 500 ms credit window, credit per quarter of it (125 ms).
    assert 0 < lat["frame_to_credit"]["p50"] < lat["frame_to_credit"]["p99"] < 1000
    assert lat["credit_lag"]["p99"] < 500
    # Finals come after endpointing_ms (500) of silence, and not long after it.
    assert 400 < lat["final_after_end_of_speech"]["p50"] < 3000
    assert lat["final_after_end_of_speech"]["count"] >= 20
    assert r["summary_audio_ms"] > 20 * 4000 and r["summary_dropped_ms"] == 0
    rows = r["timeline"]
    assert len(rows) >= 4 and max(row["active"] for row in rows) == 20


def test_swarm_tts(srv: ServerProcess, tmp_path: Path) -> None:
    r = run_swarm(srv, tmp_path, """
name = "smoke_tts"
kind = "tts"
sessions = 10
ramp_per_s = 100
duration_s = 3
pause_s = 0.3
texts = ["Hello there. How are you today?"]
""")
    s = r["sessions"]
    assert (s["completed"], s["errors"]) == (10, 0), s
    assert r["tts_turns"] >= 10 and r["frames"]["audio_bytes_in"] > 0
    ttfa = r["latency_ms"]["tts_time_to_first_audio"]
    assert ttfa["count"] >= 10 and 0 < ttfa["p50"] < 1000


def test_locust_headless(srv: ServerProcess, tmp_path: Path) -> None:
    assert importlib.util.find_spec("locust") is not None, (
        "locust is not installed: the `load` extra (scripts/setup.sh installs it)")
    prefix = tmp_path / "locust"
    env = {**os.environ, "STREAMGATE_API_KEY": TEST_KEY, "LOADTEST_UTTERANCES": "1",
           "LOADTEST_TURNS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless",
         "-u", "10", "-r", "10", "-t", "8s", "--host", srv.ws, "--csv", str(prefix),
         "--only-summary"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    with open(f"{prefix}_stats.csv", newline="") as fh:
        stats = {row["Name"]: row for row in csv.DictReader(fh) if row["Type"] == "WS"}
    # The Twilio user runs only where the endpoint answers (the locustfile checks for a 404).
    assert "answers 404" not in output, output
    expected = ["asr session", "asr time to first transcript",
                "asr final latency after end of speech", "tts session", "tts time to first audio",
                "twilio call", "twilio time to first agent audio"]
    for name in expected:
        assert name in stats, (name, sorted(stats), output)
        assert int(stats[name]["Request Count"]) > 0, stats[name]
        assert int(stats[name]["Failure Count"]) == 0, stats[name]
    assert 400 < float(stats["asr final latency after end of speech"]["Median Response Time"])


def test_bench_quick(tmp_path: Path) -> None:
    """`make bench` end to end in seconds (--quick): every part runs against its own fresh
    servers, streamgate with billing on (embedded Redis + PostgreSQL of its own, a tenant made
    through the admin API), `--workers 2` beside `--workers 1` with every process of the node
    measured, and nothing is left running afterwards. The numbers mean nothing."""
    docs = ROOT / "docs" / "benchmarks.md"
    before = docs.read_bytes()
    logs = tmp_path / "logs"
    # The Twilio calls (issue 15) have tests of their own below.
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--quick", "--logs-dir", str(logs),
         "--skip", "telephony", "--skip", "pipecat"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out  # also 1 if a server's child outlived it
    for heading in ("### Targets", "### Closed loop, window of 4 frames",
                    "### Closed loop, ack per frame", "### Real-time sessions",
                    "### Memory per idle session", "### TTS time to first audio",
                    "### `--workers 2` beside `--workers 1`"):
        assert heading in proc.stdout, out
    assert "| streamgate | 40/40 |" in proc.stdout, out
    assert "real time 40 sessions" in proc.stdout, out
    # The same 20 sessions against one worker (and 10, the load of each of two) and against a
    # supervised node of two; both workers measured, and the supervisor apart.
    assert "--workers 1: 20/20 sessions" in proc.stdout, out
    assert "--workers 1: 10/10 sessions" in proc.stdout, out
    assert "--workers 2: 20/20 sessions" in proc.stdout, out
    per_worker = re.search(r"Per worker \(`--workers 2`.*?: pid (\d+): (\d+) sessions.*?; "
                           r"pid (\d+): (\d+) sessions", proc.stdout)
    assert per_worker is not None, out
    assert per_worker[1] != per_worker[3] and int(per_worker[2]) + int(per_worker[4]) == 20, out
    assert re.search(r"\| the supervisor's own cost .*\| [\d.]+% of a core, \d+ MB RSS \| "
                     r"\(reported\) \|", proc.stdout), out
    assert re.search(r"per-core efficiency .*\| [\d.]+x: ", proc.stdout), out
    # Billing was on for every streamgate server, and usage reached PostgreSQL.
    charged = re.findall(r"bench tenant's balance in PostgreSQL went down by ([\d,]+) micros",
                         proc.stdout)
    assert len(charged) == 5 and any(c != "0" for c in charged), out
    assert docs.read_bytes() == before  # --quick never writes the document
    assert {p.name for p in logs.iterdir()} >= {"streamgate.stderr.log",
                                                 "streamgate-realtime.stderr.log",
                                                 "streamgate-workers-2.stderr.log"}
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                 and b"streamgate-bench-" in _cmdline(p)]
    assert not leftovers, [_cmdline(p) for p in leftovers]


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


def run_bench_calls(tmp_path: Path, part: str, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--quick", "--only", part, "--logs-dir",
         str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "### Targets (issue 15)" in proc.stdout, out
    return proc.stdout


def test_bench_twilio_calls(tmp_path: Path) -> None:
    """The calls-per-core bench's generator against a real streamgate (billing on, the key in
    `start.customParameters`): 5 Twilio calls for a few seconds connect, stream, get the
    agent's speech back with marks, and every byte of their audio is accepted by the server's
    own count."""
    out = run_bench_calls(tmp_path, "telephony")
    assert "bench: streamgate calls: 5 calls (5 open)" in out, out
    total = re.search(r"Whole search .*?: ([\d,]+) s of caller audio sent, ([\d.]+)% accepted, "
                      r"([\d,]+) ms dropped", out)
    assert total is not None, out
    assert int(total[1].replace(",", "")) >= 5 * 2 and float(total[2]) == 100.0, out
    assert total[3] == "0", out
    row = re.search(r"^\| 1 \| 5/5 \| .*?\| ([\d.]+|not measured) \| [\d.]+ / ([\d.]+) \|.*?"
                    r"\| ([\d,]+) / ([\d,]+) / ([\d,]+) \| \d+ \|", out, re.M)
    assert row is not None, out
    assert row[1] != "not measured" and float(row[2]) > 0, out  # ingest lag and ping RTT
    media, marks = int(row[3].replace(",", "")), int(row[4].replace(",", ""))
    assert media > 0 and marks > 0, out  # the echo agent spoke; its marks were answered
    assert "telephony 1000" in out, out  # every call ended with a normal close


def test_bench_pipecat_peer(tmp_path: Path) -> None:
    """The Pipecat peer (loadtest/pipecat_peer/server.py) serves the same Twilio calls and
    reports its STT-stage lag. `make bench` runs it from a bench-only virtualenv; here it runs
    from the tests' own Pipecat virtualenv (scripts/setup.sh builds it with the same pins:
    tests/e2e/pipecat-requirements.txt), so the peer is exercised on every run."""
    venv = Path(os.environ.get("STREAMGATE_PIPECAT_VENV", ROOT / ".venv-pipecat"))
    if not (venv / "bin" / "python").exists():
        pytest.fail(f"{venv} is missing: ./scripts/setup.sh makes it "
                    "(from tests/e2e/pipecat-requirements.txt)")
    out = run_bench_calls(tmp_path, "pipecat", STREAMGATE_BENCH_PIPECAT_VENV=str(venv))
    assert "bench: pipecat calls: 3 calls (3 open)" in out, out
    total = re.search(r"Whole search .*?: [\d,]+ s of caller audio sent, ([\d.]+)% accepted", out)
    assert total is not None and float(total[1]) > 90.0, out
    row = re.search(r"^\| 1 \| 3/3 \| [\d.]+% \| 0 \| ([\d.]+) \|", out, re.M)
    assert row is not None and float(row[1]) > 0, out
