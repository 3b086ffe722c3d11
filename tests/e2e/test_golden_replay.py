"""Golden sessions (issue 17 item 3): sessions recorded from espeak-ng speech
(tests/golden/make_golden.py) are replayed against a real server of this build; what comes back
must be what was recorded, so a change that alters what a customer receives fails here. And the
check has teeth: the same replay with a different endpointing setting differs.

Replays run faster than recorded (--speed): what is compared does not depend on pace."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from streamgate_client.replay import ReplayOptions, compare, replay
from streamgate_protocol.recording import Recording, read_recording
from tests.e2e.conftest import ROOT, TEST_KEY, ServerProcess

pytestmark = pytest.mark.e2e

GOLDEN = ROOT / "tests" / "golden"
SPEED = 8.0
# pocketsphinx decodes about as fast as 4x real time here: faster only waits for it at the end.
SPHINX_SPEED = 4.0
# pocketsphinx's cepstral mean is its session's own (sphinx_worker, pocketsphinx_engine): not
# whatever its pooled worker decoded before, so its words are compared too. Only the confidences
# of a session's later utterances move a little: the mean an utterance ends with depends on how
# its audio was cut into feeds, which timing decides.
SPHINX_IGNORES = ("confidence",)
CASES = [
    ("asr_synthetic_mulaw.jsonl", (), SPEED),
    ("asr_sphinx_pcm.jsonl", SPHINX_IGNORES, SPHINX_SPEED),
    ("tts_synthetic.jsonl", (), SPEED),
]


def golden(name: str) -> Recording:
    return read_recording(GOLDEN / name)


@pytest.mark.parametrize(("name", "ignore", "speed"), CASES,
                         ids=[c[0].split(".")[0] for c in CASES])
def test_golden_session_replays_the_same(server: ServerProcess, name: str,
                                         ignore: tuple[str, ...], speed: float) -> None:
    recording = golden(name)
    assert recording.complete
    replayed = asyncio.run(replay(recording, server.ws, ReplayOptions(speed=speed, key=TEST_KEY)))
    result = compare(recording, replayed, ignore=ignore)
    assert result.same, "\n".join(result.diff())
    # what is compared is the session, not a handful of lines
    assert len(result.recorded) >= 6


@pytest.mark.parametrize(("name", "ignore", "speed"), CASES[:2],
                         ids=[c[0].split(".")[0] for c in CASES[:2]])
def test_a_changed_endpointing_setting_fails_the_replay(server: ServerProcess, name: str,
                                                        ignore: tuple[str, ...],
                                                        speed: float) -> None:
    """1000 ms of silence to end an utterance instead of the recorded 500: the second phrase,
    followed by 700 ms of silence, is no longer ended by that pause but by the end of the
    stream, and the replay says so (with pocketsphinx too)."""
    recording = golden(name)
    replayed = asyncio.run(replay(recording, server.ws, ReplayOptions(
        speed=speed, key=TEST_KEY, params={"endpointing_ms": "1000"})))
    result = compare(recording, replayed, ignore=ignore)
    assert not result.same
    diff = result.diff()
    assert '-utterance 2: {"end_ms":3420,"type":"utterance_end","utterance_id":2}' in diff
    assert '+utterance 2: {"end_ms":4299,"type":"utterance_end","utterance_id":2}' in diff


def run_cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "replay", *args, "--url", server.ws,
         "--key", TEST_KEY, "--speed", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_streamgate_replay_exit_codes(server: ServerProcess) -> None:
    path = str(GOLDEN / "tts_synthetic.jsonl")
    same = run_cli(server, path)
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.startswith("same: ")
    # another output rate is another session: exit 1 and a diff on stdout
    changed = run_cli(server, path, "--param", "sample_rate=8000")
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert changed.stdout.startswith("--- recording\n+++ replay\n")
    assert '"sample_rate":8000' in changed.stdout


def test_streamgate_replay_refuses_what_is_not_a_recording(server: ServerProcess,
                                                           tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.jsonl"
    bogus.write_text('{"type":"transcript"}\n')
    result = run_cli(server, str(bogus))
    assert result.returncode == 2
    assert "not a streamgate recording" in result.stderr
