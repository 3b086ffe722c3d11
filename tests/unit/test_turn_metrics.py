"""Per-turn latency metrics of issue 17 that no other test covers: the LLM upstream's time to
its first token, observed for attempts that answered only."""

from __future__ import annotations

from server.telemetry.metrics import Metrics
from tests.fakes.upstream import closed_port_url
from tests.unit.test_llm_router import complete, drain, fakes, provider, routing

FIRST_TOKEN = "streamgate_llm_first_token_seconds_count"


async def test_llm_time_to_first_token_by_provider_and_mode() -> None:
    metrics = Metrics()
    async with fakes(1) as (b,), routing(provider("a", closed_port_url()), provider("b", b.url),
                                         metrics=metrics) as r:
        await complete(r)
        await drain(r)
    sample = metrics.registry.get_sample_value
    assert sample(FIRST_TOKEN, {"provider": "b", "mode": "complete"}) == 1.0
    assert sample(FIRST_TOKEN, {"provider": "b", "mode": "stream"}) == 1.0
    # Provider a never answered (its port is closed): no latency to report for it.
    assert sample(FIRST_TOKEN, {"provider": "a", "mode": "complete"}) is None
