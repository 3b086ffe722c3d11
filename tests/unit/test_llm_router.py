"""LlmRouter against real fake upstreams over HTTP: order, retries, failover, breakers, deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import generate_latest

from server.config import LlmConfig, LlmProviderConfig
from server.llm.provider import AttemptFailed
from server.llm.router import LlmRouter, RouteError
from server.models.breaker import CircuitBreaker
from server.telemetry.metrics import Metrics
from tests.fakes.upstream import FakeLlmUpstream, LlmReply, closed_port_url

MESSAGES = [{"role": "user", "content": "hi"}]


def provider(name: str, url: str, **overrides: Any) -> LlmProviderConfig:
    values: dict[str, Any] = {
        "name": name, "url": url, "models": {"chat": f"{name}-model"},
        "connect_timeout_s": 0.5, "first_byte_timeout_s": 0.25, "timeout_s": 2.0,
        "retries": 1, "backoff_s": 0.01, "breaker_failures": 2, "breaker_reset_s": 30.0,
    }
    values.update(overrides)
    return LlmProviderConfig(**values)


@contextlib.asynccontextmanager
async def routing(*providers: LlmProviderConfig, deadline_s: float = 3.0,
                  metrics: Metrics | None = None) -> AsyncIterator[LlmRouter]:
    router = LlmRouter(LlmConfig(providers=list(providers), request_deadline_s=deadline_s),
                       metrics)
    await router.start()
    try:
        yield router
    finally:
        await router.aclose()  # in the body: its connections keep fake handlers alive


@contextlib.asynccontextmanager
async def fakes(n: int = 2) -> AsyncIterator[list[FakeLlmUpstream]]:
    started = [FakeLlmUpstream(f"u{i}") for i in range(n)]
    try:
        for fake in started:
            await fake.start()
        yield started
    finally:
        for fake in started:
            await fake.aclose()


def deadline(seconds: float = 3.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def complete(router: LlmRouter, model: str = "chat", seconds: float = 3.0) -> str:
    p, _, parsed = await router.complete(model, {"messages": MESSAGES}, deadline(seconds))
    assert parsed.choices[0].message.content == "Hello there."
    return p.name


async def test_primary_answers_with_the_upstream_model_name() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url), provider("b", b.url)) as r:
        assert await complete(r) == "a"
        assert a.llm_requests == [{"messages": MESSAGES, "model": "a-model"}]
        assert b.llm_requests == []


async def test_priority_wins_over_config_order() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url, priority=5),
                                          provider("b", b.url, priority=1)) as r:
        assert await complete(r) == "b"


async def test_5xx_is_retried_on_the_same_provider() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url), provider("b", b.url)) as r:
        a.script_llm(LlmReply.error(503))
        assert await complete(r) == "a"
        assert len(a.llm_requests) == 2 and b.llm_requests == []
        assert r.providers[0].breaker.state == "closed"


async def test_429_waits_for_retry_after() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url), provider("b", b.url)) as r:
        a.script_llm(LlmReply.error(429, retry_after=0.2))
        t0 = time.perf_counter()
        assert await complete(r) == "a"
        assert time.perf_counter() - t0 >= 0.2


async def test_retry_after_beyond_the_deadline_fails_over_at_once() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url), provider("b", b.url)) as r:
        a.script_llm(LlmReply.error(429, retry_after=30))
        t0 = time.perf_counter()
        assert await complete(r) == "b"
        assert time.perf_counter() - t0 < 1.0


async def test_connection_refused_fails_over_and_opens_the_breaker() -> None:
    async with fakes(1) as (b,), routing(provider("a", closed_port_url()),
                                         provider("b", b.url)) as r:
        assert await complete(r) == "b"
        assert r.providers[0].breaker.state == "open"  # 2 attempts = breaker_failures
        assert await complete(r) == "b"  # skipped without a connection attempt now


@pytest.mark.parametrize("reply", [LlmReply.garbage(), LlmReply.wrong_shape(),
                                   LlmReply(content="", body=b'{"choices": [{"index": 0}]}')])
async def test_garbage_fails_over_without_retry(reply: LlmReply) -> None:
    async with fakes() as (a, b), routing(provider("a", a.url), provider("b", b.url)) as r:
        a.llm_default = reply
        assert await complete(r) == "b"
        assert len(a.llm_requests) == 1  # the same request would get the same garbage
        assert r.providers[0].breaker.consecutive_failures == 1


async def test_slow_primary_fails_over_within_the_deadline() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url, retries=0),
                                          provider("b", b.url), deadline_s=2.0) as r:
        a.llm_default = LlmReply(delay_s=5.0)
        t0 = time.perf_counter()
        assert await complete(r, seconds=2.0) == "b"
        assert 0.25 <= time.perf_counter() - t0 < 1.0


async def test_dropped_connection_is_retried_then_fails_over() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url), provider("b", b.url)) as r:
        a.llm_default = LlmReply.dropped()
        assert await complete(r) == "b"
        assert len(a.llm_requests) == 2


async def test_upstream_rejecting_the_request_is_relayed_not_failed_over() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url), provider("b", b.url)) as r:
        a.llm_default = LlmReply.error(400)
        with pytest.raises(RouteError) as err:
            await complete(r)
        assert (err.value.status, err.value.code) == (400, "bad_request")
        assert b.llm_requests == [] and r.providers[0].breaker.state == "closed"


async def test_unauthorized_upstream_fails_over() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url), provider("b", b.url)) as r:
        a.llm_default = LlmReply.error(401)
        assert await complete(r) == "b"
        assert len(a.llm_requests) == 1


async def test_every_provider_failing_is_502() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url), provider("b", b.url)) as r:
        a.llm_default = b.llm_default = LlmReply.error(500)
        with pytest.raises(RouteError) as err:
            await complete(r)
        assert (err.value.status, err.value.code) == (502, "upstream_error")
        assert len(a.llm_requests) == len(b.llm_requests) == 2


async def test_every_provider_slow_is_504_at_the_deadline() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url, retries=5, first_byte_timeout_s=0.2),
                                          provider("b", b.url, retries=5), deadline_s=0.5) as r:
        a.llm_default = b.llm_default = LlmReply(delay_s=5.0)
        t0 = time.perf_counter()
        with pytest.raises(RouteError) as err:
            await complete(r, seconds=0.5)
        assert (err.value.status, err.value.code) == (504, "upstream_timeout")
        assert time.perf_counter() - t0 < 0.8


async def test_every_breaker_open_is_503_with_retry_after() -> None:
    async with routing(provider("a", closed_port_url(), breaker_failures=1, breaker_reset_s=7),
                       provider("b", closed_port_url(), breaker_failures=1)) as r:
        with pytest.raises(RouteError) as err:
            await complete(r)
        assert err.value.status == 502
        with pytest.raises(RouteError) as err:
            await complete(r)
        assert (err.value.status, err.value.code) == (503, "no_upstream")
        assert err.value.headers == {"Retry-After": "7"}


async def test_half_open_primary_gets_its_traffic_back() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url, breaker_failures=1, retries=0,
                                                   breaker_reset_s=0.2),
                                          provider("b", b.url)) as r:
        a.script_llm(LlmReply.error(500))
        assert await complete(r) == "b"
        assert await complete(r) == "b"  # open: skipped
        await asyncio.sleep(0.25)
        assert await complete(r) == "a"  # the half-open trial succeeds
        assert r.providers[0].breaker.state == "closed"


async def test_unknown_model_and_no_providers() -> None:
    async with routing() as r:
        with pytest.raises(RouteError) as err:
            r.check_model("chat")
        assert (err.value.status, err.value.code) == (503, "no_upstream")
    async with fakes(1) as (a,), routing(provider("a", a.url)) as r:
        with pytest.raises(RouteError) as err:
            await complete(r, model="nope")
        assert (err.value.status, err.value.code) == (404, "unknown_model")


async def test_saturated_provider_fails_over_without_a_breaker_failure() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url, max_concurrency=1,
                                                   first_byte_timeout_s=1.0),
                                          provider("b", b.url)) as r:
        a.script_llm(LlmReply(delay_s=0.5))
        first = asyncio.create_task(complete(r))
        await asyncio.sleep(0.05)
        # The slot waits up to first_byte_timeout_s (1 s), longer than the 0.5 s delay:
        # the second request queues behind the first on the same provider.
        assert await complete(r) == "a"
        assert await first == "a"
    async with fakes() as (a, b), routing(provider("a", a.url, max_concurrency=1,
                                                   first_byte_timeout_s=0.1, timeout_s=2.0),
                                          provider("b", b.url)) as r:
        a.script_llm(LlmReply(delay_s=0.05), LlmReply(delay_s=0.05))
        stream = await r.open_stream("chat", {"messages": MESSAGES}, deadline())
        try:
            assert await complete(r) == "b"  # a's only slot is held by the stream
            assert r.providers[0].breaker.consecutive_failures == 0
        finally:
            stream.close()


async def test_breaker_state_is_published_as_a_metric() -> None:
    metrics = Metrics()
    async with fakes(1) as (b,), routing(provider("a", closed_port_url()), provider("b", b.url),
                                         metrics=metrics) as r:
        await complete(r)
        r.publish_metrics()
        text = generate_latest(metrics.registry).decode()
        assert 'streamgate_llm_upstream_breaker_state{provider="a"} 2.0' in text
        assert 'streamgate_llm_upstream_breaker_state{provider="b"} 0.0' in text
        assert 'streamgate_llm_upstream_attempts_total{outcome="retryable",provider="a"} 2.0' \
            in text


# --- streams ---------------------------------------------------------------------------------


async def drain(router: LlmRouter, seconds: float = 3.0) -> tuple[str, list[str], Any]:
    stream = await router.open_stream("chat", {"messages": MESSAGES, "stream": True,
                                               "stream_options": {"include_usage": True}},
                                      deadline(seconds))
    texts, usage = [], None
    try:
        while (item := await stream.next()) is not None:
            texts.append(item.chunk.text)
            usage = item.chunk.usage or usage
    finally:
        stream.close()
    return stream.provider.name, texts, usage


async def test_stream_passes_chunks_in_order_with_usage() -> None:
    async with fakes(1) as (a,), routing(provider("a", a.url)) as r:
        a.llm_default = LlmReply(content="one two three", chunk_delay_s=0.01)
        name, texts, usage = await drain(r)
        assert name == "a" and "".join(texts) == "one two three"
        assert texts[1:4] == ["one", " two", " three"]
        assert usage is not None and usage.completion_tokens == 3


@pytest.mark.parametrize("reply", [LlmReply.garbage(), LlmReply.wrong_shape(),
                                   LlmReply(delay_s=5.0), LlmReply.dropped(),
                                   LlmReply(events=[b'{"error": {"message": "overloaded"}}'])])
async def test_stream_fails_over_before_the_first_chunk(reply: LlmReply) -> None:
    async with fakes() as (a, b), routing(provider("a", a.url, retries=0),
                                          provider("b", b.url)) as r:
        a.llm_default = reply
        name, texts, _ = await drain(r)
        assert name == "b" and "".join(texts) == "Hello there."


async def test_stream_failure_after_the_first_chunk_is_not_retried() -> None:
    async with fakes() as (a, b), routing(provider("a", a.url), provider("b", b.url)) as r:
        a.llm_default = LlmReply(content="a b c d", drop_after=3)
        stream = await r.open_stream("chat", {"messages": MESSAGES, "stream": True},
                                     deadline())
        try:
            got = [await stream.next(), await stream.next(), await stream.next()]
            assert [g.chunk.text for g in got if g is not None] == ["", "a", " b"]
            with pytest.raises(AttemptFailed):
                await stream.next()
        finally:
            stream.close()
        assert b.llm_requests == []


async def test_stream_that_stalls_mid_answer_times_out() -> None:
    async with fakes(1) as (a,), routing(provider("a", a.url)) as r:
        a.llm_default = LlmReply(content="a b", chunk_delay_s=1.0)
        stream = await r.open_stream("chat", {"messages": MESSAGES, "stream": True},
                                     deadline())
        try:
            assert await stream.next() is not None
            with pytest.raises(AttemptFailed) as err:
                await stream.next()
            assert err.value.timeout
        finally:
            stream.close()


async def test_provider_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LLM_KEY", "sk-test")
    async with fakes(1) as (a,), routing(provider("a", a.url, api_key_env="FAKE_LLM_KEY")) as r:
        await complete(r)
        assert a.llm_headers[0]["Authorization"] == "Bearer sk-test"
    monkeypatch.delenv("FAKE_LLM_KEY")
    router = LlmRouter(LlmConfig(providers=[provider("a", "http://x", api_key_env="FAKE_LLM_KEY")]))
    with pytest.raises(RuntimeError, match="FAKE_LLM_KEY"):
        await router.start()  # a missing secret fails start-up, not every request


# --- streams that break mid-answer (issue 11 item 18) -----------------------------------------


async def read_until_broken(router: LlmRouter) -> tuple[str, AttemptFailed]:
    """Open a stream, read it until it fails, close it; (provider, failure)."""
    stream = await router.open_stream("chat", {"messages": MESSAGES, "stream": True},
                                      deadline())
    try:
        while True:
            try:
                if await stream.next() is None:
                    raise AssertionError("the stream was meant to break, it completed")
            except AttemptFailed as exc:
                return stream.provider.name, exc
    finally:
        stream.close()


async def test_streams_breaking_mid_answer_open_the_breaker_and_count_as_failures() -> None:
    metrics = Metrics()
    async with fakes() as (a, b), routing(provider("a", a.url, breaker_failures=3),
                                          provider("b", b.url, priority=1),
                                          metrics=metrics) as r:
        a.llm_default = LlmReply(content="a b c d e f", drop_after=3)  # dies after 3 events
        for n in range(3):
            name, failure = await read_until_broken(r)
            assert name == "a" and failure.kind == "retryable"
            assert r.providers[0].breaker.consecutive_failures == n + 1
        assert r.providers[0].breaker.state == "open"
        assert len(a.llm_requests) == 3
        # The next request goes to the fallback; the broken one is not even tried.
        name, texts, _ = await drain(r)
        assert name == "b" and "".join(texts) == "Hello there."
        assert len(a.llm_requests) == 3
        r.publish_metrics()
        text = generate_latest(metrics.registry).decode()
        assert 'streamgate_llm_upstream_attempts_total{outcome="retryable",provider="a"} 3.0' \
            in text
        assert 'outcome="ok",provider="a"' not in text
        assert 'streamgate_llm_upstream_attempts_total{outcome="ok",provider="b"} 1.0' in text
        assert 'streamgate_llm_upstream_breaker_state{provider="a"} 2.0' in text


async def test_a_stream_is_a_success_only_once_it_completes() -> None:
    metrics = Metrics()
    async with fakes(1) as (a,), routing(provider("a", a.url, breaker_failures=3),
                                         metrics=metrics) as r:
        a.llm_default = LlmReply(content="a b c d e f", drop_after=3)
        await read_until_broken(r)
        await read_until_broken(r)
        a.llm_default = LlmReply(content="one two")
        name, texts, _ = await drain(r)  # a whole answer resets the count
        assert (name, "".join(texts)) == ("a", "one two")
        assert r.providers[0].breaker.consecutive_failures == 0
        # Open but not yet read to the end: nothing is counted until it is closed.
        stream = await r.open_stream("chat", {"messages": MESSAGES, "stream": True},
                                     deadline())
        assert 'outcome="client_closed"' not in generate_latest(metrics.registry).decode()
        stream.close()  # the client left before [DONE]: not the upstream's failure
        text = generate_latest(metrics.registry).decode()
        assert 'streamgate_llm_upstream_attempts_total{outcome="client_closed",provider="a"} ' \
               '1.0' in text
        assert 'streamgate_llm_upstream_attempts_total{outcome="ok",provider="a"} 1.0' in text
        assert r.providers[0].breaker.consecutive_failures == 0


async def test_a_half_open_trial_stream_that_breaks_reopens_the_breaker() -> None:
    now = [0.0]
    async with fakes() as (a, b), routing(provider("a", a.url, retries=0),
                                          provider("b", b.url, priority=1)) as r:
        breaker = r.providers[0].breaker = CircuitBreaker(1, 30.0, clock=lambda: now[0])
        a.llm_default = LlmReply(content="a b c d e f", drop_after=3)
        await read_until_broken(r)
        states = [breaker.state]
        now[0] += 30.0
        states.append(breaker.state)
        name, _ = await read_until_broken(r)  # the trial goes to a, and breaks again
        states.append(breaker.state)
        assert name == "a" and states == ["open", "half_open", "open"]


# --- what clients are told when an upstream fails (issue 11 item 10) --------------------------


async def test_route_errors_name_the_provider_and_a_cause_never_host_port_or_exception(
        caplog: pytest.LogCaptureFixture) -> None:
    down = closed_port_url()
    async with routing(provider("local-vllm", down, retries=0)) as r:
        with pytest.raises(RouteError) as err:
            await complete(r)
    message = err.value.message
    assert (err.value.status, err.value.code) == (502, "upstream_error")
    assert "provider 'local-vllm' unavailable: connect failed" in message
    host_port = down.removeprefix("http://")
    for leak in (host_port, host_port.split(":")[1], "127.0.0.1", "ClientConnector",
                 "Connect call failed", "Cannot connect"):
        assert leak not in message
    # The operator still gets every detail, in the log.
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert host_port in logged and "ClientConnectorError" in logged


@pytest.mark.parametrize(("reply", "cause"), [
    (LlmReply.error(500), "bad status 500"),
    (LlmReply.garbage(b"<html>nginx at 10.1.2.3:8000 says no</html>"), "bad response"),
])
async def test_upstream_bodies_are_not_relayed(reply: LlmReply, cause: str) -> None:
    async with fakes(1) as (a,), routing(provider("a", a.url, retries=0)) as r:
        a.llm_default = reply
        with pytest.raises(RouteError) as err:
            await complete(r)
        assert err.value.message.endswith(f"provider 'a' unavailable: {cause}")
        assert "10.1.2.3" not in err.value.message and "fake" not in err.value.message
