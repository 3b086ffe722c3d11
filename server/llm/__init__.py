"""The LLM proxy: OpenAI-compatible chat completions (and translation on top of them), routed
across configured upstream providers by priority and health, metered in tokens.

    schema.py       wire types (client requests, upstream answers) and their OpenAPI schemas
    sse.py          incremental text/event-stream parser
    provider.py     one upstream: HTTP session, timeouts, circuit breaker, answer validation
    router.py       provider order, bounded retries, failover, the request deadline
    metering.py     token estimates for the reservation, settlement from usage
    idempotency.py  Idempotency-Key replay cache (in-process)
"""
