"""README.md's "Using it from code" snippet, run as written against a real server with billing
on (issue 11, item 17: it used to fail with 401). Only the server's address and the WAV path
are replaced (the test server listens on a free port); the key comes the way the snippet says:
the dev key file in the working directory, as `./scripts/run.sh` leaves it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamgate_client.asr_client import API_KEY_ENV, DEV_KEY_FILE
from tests.e2e.conftest import ROOT, ServerProcess, espeak_pcm16, silence
from tests.e2e.test_billing_e2e import (
    Admin,
    billing_server,
)

pytestmark = pytest.mark.e2e
README_REDIS_DB = 2  # a Redis logical database of this module alone
README_URL = "ws://127.0.0.1:8765"
README_WAV = "/tmp/hello.wav"


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def python_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", readme_section("Using it from code"), re.S)
    assert len(blocks) == 1, blocks
    return str(blocks[0])


@pytest.fixture(scope="module")
def readme_server(redis_url: str, database_url: str) -> Iterator[tuple[ServerProcess, Admin]]:
    with billing_server(redis_url, database_url, README_REDIS_DB) as env:
        yield env.server, env.admin


def test_snippet_names_the_demo_server_and_file() -> None:
    snippet = python_snippet()
    assert README_URL in snippet and README_WAV in snippet


def test_using_it_from_code_snippet_runs_as_written_with_billing_on(
        readme_server: tuple[ServerProcess, Admin], tmp_path: Path) -> None:
    srv, admin = readme_server
    tenant = admin.tenant(funded=1_000_000)
    wav_path = tmp_path / "hello.wav"
    with wave.open(str(wav_path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(silence(300) + espeak_pcm16("hello world") + silence(800))
    code = (python_snippet().replace(README_URL, srv.ws)
            .replace(README_WAV, str(wav_path)))
    # The dev key where `./scripts/run.sh` leaves it, relative to where the user runs Python.
    key_file = tmp_path / DEV_KEY_FILE
    key_file.parent.mkdir(parents=True)
    key_file.write_text(tenant.key + "\n")
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines and lines[0].startswith("Ready("), done.stdout[:500]
    summary = [line for line in lines if line.startswith("Summary(")]
    assert len(summary) == 1, done.stdout[-1000:]
    audio_ms = int(re.search(r"audio_ms=(\d+)", summary[0]).group(1))  # type: ignore[union-attr]
    cost = int(re.search(r"cost_micros=(\d+)", summary[0]).group(1))  # type: ignore[union-attr]
    assert audio_ms > 1000 and cost > 0, summary


def sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_commands_write_files_only_under_tmp() -> None:
    """A user who pastes the README's commands in the checkout gets no stray files in it."""
    targets = []
    for block in sh_blocks():
        for line in block.splitlines():
            line = line.split("#", 1)[0]
            targets += re.findall(r"(?:^|\s)(?:>|-o|--out|-w)\s+(\S+)", line)
    assert targets, "no output files found: the pattern no longer matches the README"
    assert [t for t in targets if not t.startswith("/tmp/")] == []


def test_readme_shows_the_tts_command_and_what_billing_does_to_anonymous_access() -> None:
    tts = readme_section("Text to speech and phone calls")
    assert re.search(r"^\.venv/bin/streamgate tts \S", tts, re.M), tts
    anonymous = next(line for line in readme_section("Configuration").splitlines()
                     if line.startswith("| `auth.allow_anonymous`"))
    assert "billing" in anonymous and "off" in anonymous, anonymous
    tenants = readme_section("Tenants, keys and wallets")
    assert "spendable_micros" in tenants and "null" in tenants
