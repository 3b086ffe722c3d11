"""schemathesis against /openapi.json of a real server process: no 5xx, responses match the
schema. An OpenAI-compatible fake stands in for the LLM provider (with none configured the LLM
routes answer 503 `no_upstream` by design)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import TEST_KEY, start_server
from tests.fakes.upstream import FakeLlmUpstream

pytestmark = pytest.mark.e2e


async def test_schemathesis_finds_no_contract_violation() -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    if not schemathesis.exists():
        pytest.fail("schemathesis missing: it is a dev dependency (./scripts/setup.sh)")
    async with FakeLlmUpstream("llm") as upstream:
        providers = f'[{{name="fake", url="{upstream.url}", models={{chat="fake-model"}}}}]'
        srv = await asyncio.to_thread(start_server, {
            "STREAMGATE_LLM__PROVIDERS": providers,
            "STREAMGATE_LLM__PRICE_MICROS_PER_1K_TOKENS": '{chat = 1000}',
        })
        try:
            proc = await asyncio.create_subprocess_exec(
                str(schemathesis), "--config-file", str(Path(__file__).with_name(
                    "schemathesis.toml")), "run", f"{srv.http}/openapi.json",
                "--checks", "all",
                # Random bytes are not audio or a document: a 400 for them is right.
                "--exclude-checks", "positive_data_acceptance",
                "--max-examples", "25", "--seed", "1",
                "-H", f"Authorization: Bearer {TEST_KEY}",
                "--request-timeout", "20", "--no-color",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 240)
        finally:
            code = await asyncio.to_thread(srv.stop)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert code == 0, "\n".join(srv.stderr_lines[-30:])
