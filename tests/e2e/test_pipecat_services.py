"""Pipecat pointed at streamgate (issue 14): `OpenAITTSService`, `DeepgramTTSService`,
`DeepgramSTTService` and `OpenAISTTService`, each with its `base_url` and the key the only
changes from the hosted API, run in Pipecat pipelines against a real server process with
billing on; their usage lands on the tenant's wallet and `streamgate reconcile` finds the books
in order.

The pipelines run in a process of their own under the Pipecat virtualenv that scripts/setup.sh
makes (tests/e2e/pipecat_client.py; docs/decisions/14G1-pipecat-client-venv.md), so Pipecat's
pinned soxr and soundfile never replace the server's.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.models.synthetic import VOCABULARY
from tests.e2e.conftest import ROOT
from tests.e2e.test_billing_e2e import Billing, Tenant, assert_books_balance, billing_server
from tests.e2e.test_cli import streamgate
from tests.e2e.test_deepgram_sdk import charged_audio_ms
from tests.e2e.test_tts_billing import charged_units
from tests.speech import espeak_pcm16, silence

pytestmark = pytest.mark.e2e

# test_openai_audio_sdk's: the modules run one after the other and each removes its tenants, so
# reconcile sees only this module's.
REDIS_DB = 9
FUNDED = 1_000_000
PRICE_PER_MIN = 1000  # [asr.models.synthetic] price_micros_per_minute in config/default.toml
PIPECAT_VENV = Path(os.environ.get("STREAMGATE_PIPECAT_VENV", ROOT / ".venv-pipecat"))
CLIENT = Path(__file__).with_name("pipecat_client.py")
SPEECH_TEXT = "Hello from the gateway. Pipecat speaks through streamgate unchanged."
OUT_RATE = 24000  # OpenAITTSService's (OpenAI's pcm), DeepgramTTSService's (the pipeline's)
# DeepgramSTTService sends KeepAlive every 5 s (Deepgram closes a silent socket after 10 s): an
# idle timeout above that, below the mute between two turns (tests/e2e/server.toml has 1.5 s).
IDLE_TIMEOUT_S = 7.5
MUTE_S = 8.5
SEGMENT_PADDING_MS = 500  # SegmentedSTTService's trailing_silence_secs


@pytest.fixture(scope="module")
def pipecat_python() -> Path:
    python = PIPECAT_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: ./scripts/setup.sh makes it "
                    "(from tests/e2e/pipecat-requirements.txt)")
    return python


@pytest.fixture(scope="module")
def billed(redis_url: str, database_url: str) -> Iterator[Billing]:
    with billing_server(redis_url, database_url, REDIS_DB,
                        server__idle_timeout_s=IDLE_TIMEOUT_S) as env:
        yield env


def run_pipeline(python: Path, *args: str) -> dict[str, Any]:
    """One pipeline of tests/e2e/pipecat_client.py; what it saw, from its last stdout line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DEEPGRAM_"))}
    done = subprocess.run([str(python), str(CLIENT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    log = "\n".join(line for line in done.stderr.splitlines() if "Linking" not in line)
    assert done.returncode == 0 and done.stdout.strip(), f"exit {done.returncode}:\n{log[-4000:]}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def assert_billed_and_reconciled(billed: Billing, tenant: Tenant,
                                       expected_usage: int | None = None) -> int:
    """The books balance for the tenant and `streamgate reconcile` exits 0; the usage charged."""
    pg = await assert_books_balance(billed.dsn, billed.redis_url, tenant.tenant_id,
                                    expected_usage=expected_usage)
    assert pg.usage > 0 and pg.balance == pg.topups - pg.usage
    wallet = await asyncio.to_thread(billed.admin.balance, tenant.tenant_id)
    assert wallet["balance_micros"] == wallet["spendable_micros"] == FUNDED - pg.usage
    done = await asyncio.to_thread(streamgate, billed.redis_url, billed.dsn, "reconcile")
    assert done.returncode == 0, (done.stdout, done.stderr)
    return pg.usage


@pytest.mark.parametrize("service", ["openai", "deepgram"])
async def test_tts_service_speaks_and_is_billed(billed: Billing, pipecat_python: Path,
                                                tmp_path: Path, service: str) -> None:
    tenant = billed.admin.tenant(funded=FUNDED)
    out = tmp_path / "speech.pcm"
    # Pipecat's defaults (OpenAITTSService: gpt-4o-mini-tts and alloy, 24 kHz pcm;
    # DeepgramTTSService: aura-2-helena-en, linear16 at the pipeline's 24 kHz): served by our
    # default TTS model, espeak-en.
    base_url = f"{billed.server.http}/v1" if service == "openai" else billed.server.ws
    seen = await asyncio.to_thread(
        run_pipeline, pipecat_python, "tts", "--service", service, "--base-url", base_url,
        "--api-key", tenant.key, "--text", SPEECH_TEXT, "--out", str(out))
    assert seen["errors"] == []
    assert "TTSStartedFrame" in seen["frame_types"] and "TTSStoppedFrame" in seen["frame_types"]
    assert seen["sample_rates"] == [OUT_RATE] and seen["channels"] == [1]
    pcm = out.read_bytes()
    assert len(pcm) == seen["audio_bytes"] and len(pcm) % 2 == 0
    # Real speech of the text: about as long as espeak-ng says it itself, and not silence.
    spoken_s = len(pcm) / 2 / OUT_RATE
    reference_s = len(espeak_pcm16(SPEECH_TEXT, OUT_RATE)) / 2 / OUT_RATE
    assert 0.8 * reference_s < spoken_s < 1.25 * reference_s, (spoken_s, reference_s)
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    assert np.sqrt(np.mean(samples ** 2)) > 300
    charged = await assert_billed_and_reconciled(billed, tenant)
    units, cost = await charged_units(billed.dsn, tenant.tenant_id)
    # The characters synthesized (the text chunker drops the space between sentences).
    assert len(SPEECH_TEXT) - 2 <= units <= len(SPEECH_TEXT) and cost == charged


async def test_deepgram_stt_service_transcribes_and_is_billed(billed: Billing,
                                                              pipecat_python: Path,
                                                              tmp_path: Path) -> None:
    tenant = billed.admin.tenant(funded=FUNDED)
    turns = [tmp_path / "turn1.pcm", tmp_path / "turn2.pcm"]
    turns[0].write_bytes(silence(300) + espeak_pcm16("one two three four five") + silence(300))
    turns[1].write_bytes(espeak_pcm16("six seven") + silence(300))
    # Pipecat's defaults (nova-3-general, linear16, interim results): our default ASR model.
    # Between the turns the microphone is muted for longer than the server's idle timeout:
    # Pipecat's KeepAlive holds the connection.
    seen = await asyncio.to_thread(
        run_pipeline, pipecat_python, "stt", "--base-url", billed.server.ws,
        "--api-key", tenant.key, "--sample-rate", "16000", "--audio", str(turns[0]),
        "--mute-s", str(MUTE_S), "--audio", str(turns[1]))
    assert seen["errors"] == []
    assert len(seen["finals"]) == 2, seen
    for final in seen["finals"]:
        words = final.split()
        assert words and set(words) <= set(VOCABULARY), seen  # the synthetic engine's words
    assert seen["interims"] and seen["interims"][0] in seen["finals"][0]
    # Each turn's end (the VAD's stop) sent Finalize before the server's 500 ms endpointing could
    # end the utterance: each final answers it, as Pipecat waits for.
    assert seen["from_finalize"] == [True, True]
    # Charged exactly the audio Pipecat sent (the turns, then the microphone's silence).
    audio_ms = seen["audio_bytes_sent"] // 32
    await assert_billed_and_reconciled(billed, tenant,
                                       expected_usage=-(-audio_ms * PRICE_PER_MIN // 60_000))
    assert await charged_audio_ms(billed.dsn, tenant.tenant_id) == audio_ms


async def test_openai_stt_service_transcribes_a_turn_and_is_billed(billed: Billing,
                                                                   pipecat_python: Path,
                                                                   tmp_path: Path) -> None:
    tenant = billed.admin.tenant(funded=FUNDED)
    turn = tmp_path / "turn.pcm"
    turn.write_bytes(silence(300) + espeak_pcm16("one two three four five") + silence(300))
    # A segmented service: the audio between the VAD's start and stop, padded with Pipecat's
    # half second of silence, posted as one WAV, with Pipecat's default model name.
    seen = await asyncio.to_thread(
        run_pipeline, pipecat_python, "stt", "--service", "openai",
        "--base-url", f"{billed.server.http}/v1", "--api-key", tenant.key,
        "--sample-rate", "16000", "--audio", str(turn))
    assert seen["errors"] == []
    assert len(seen["finals"]) == 1, seen
    words = seen["finals"][0].split()
    assert words and set(words) <= set(VOCABULARY), seen
    segment_ms = len(turn.read_bytes()) // 32 + SEGMENT_PADDING_MS
    await assert_billed_and_reconciled(billed, tenant,
                                       expected_usage=-(-segment_ms * PRICE_PER_MIN // 60_000))
    assert await charged_audio_ms(billed.dsn, tenant.tenant_id) == segment_ms
