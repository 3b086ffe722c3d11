"""Prometheus metrics. Hot paths count into plain ints and the housekeeping tick publishes
them, because a prometheus_client `inc()` per 20 ms frame costs more than decoding the frame."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        # Gauges summed over live sessions are computed when scraped, not kept up to date.
        self.scrape_hooks: list[Callable[[], None]] = []
        self.sessions_active = Gauge(
            "streamgate_sessions_active", "Live sessions", ["kind"], registry=r
        )
        self.sessions_total = Counter(
            "streamgate_sessions_total", "Sessions ended, by close code", ["kind", "code"],
            registry=r,
        )
        self.upgrades_rejected = Counter(
            "streamgate_upgrades_rejected_total", "Upgrades refused before 101", ["status"],
            registry=r,
        )
        self.connections_open = Gauge(
            "streamgate_connections_open", "Open TCP connections on the WebSocket port",
            registry=r,
        )
        self.frames_in = Counter(
            "streamgate_frames_in_total", "WebSocket data frames received", ["kind"], registry=r
        )
        self.frames_out = Counter(
            "streamgate_frames_out_total", "WebSocket data frames sent", ["kind"], registry=r
        )
        self.bytes_in = Counter(
            "streamgate_bytes_in_total", "Payload bytes received", ["kind"], registry=r
        )
        self.bytes_out = Counter(
            "streamgate_bytes_out_total", "Payload bytes sent", ["kind"], registry=r
        )
        self.queue_depth_ms = Gauge(
            "streamgate_queue_depth_ms", "Audio waiting per stage, summed over sessions",
            ["stage"], registry=r,
        )
        self.stage_seconds = Histogram(
            "streamgate_stage_seconds", "Time spent per stage batch", ["stage"], registry=r,
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
        )
        self.engine_seconds = Histogram(
            "streamgate_engine_seconds", "Engine call latency", ["model", "op"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.engine_errors = Counter(
            "streamgate_engine_errors_total", "Engine failures", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "streamgate_engine_batch_size", "Micro-batch sizes", ["model"], registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.breaker_open = Gauge(
            "streamgate_engine_breaker_open", "1 while a model's circuit breaker is open",
            ["model"], registry=r,
        )
        self.credit_outstanding = Gauge(
            "streamgate_credit_outstanding_bytes", "Audio credit held by clients", registry=r
        )
        self.audio_ms = Counter(
            "streamgate_audio_accepted_ms_total", "Decoded audio accepted at ingest", ["kind"],
            registry=r,
        )
        self.dropped_ms = Counter(
            "streamgate_audio_dropped_ms_total", "Audio dropped by overflow=drop", ["kind"],
            registry=r,
        )

        # LLM proxy (server/llm): per-upstream health and where requests went.
        self.llm_breaker_state = Gauge(
            "streamgate_llm_upstream_breaker_state",
            "LLM upstream circuit breaker: 0 closed, 1 half-open, 2 open", ["provider"],
            registry=r,
        )
        self.llm_attempts = Counter(
            "streamgate_llm_upstream_attempts_total",
            "Calls to LLM upstreams by outcome (ok, retryable, malformed, rejected)",
            ["provider", "outcome"], registry=r,
        )
        self.llm_tokens = Counter(
            "streamgate_llm_tokens_total", "Tokens settled for LLM requests", ["model"],
            registry=r,
        )

    def before_scrape(self) -> None:
        for hook in self.scrape_hooks:
            hook()
