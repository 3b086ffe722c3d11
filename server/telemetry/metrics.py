"""Prometheus metrics. Hot paths count into plain ints and the housekeeping tick publishes
them, because a prometheus_client `inc()` per 20 ms frame costs more than decoding the frame.

Under `streamgate serve --workers N` every worker runs with PROMETHEUS_MULTIPROC_DIR set by the
supervisor (server/supervisor): prometheus-client then keeps each value in a per-process file and
`/metrics`, whichever worker answers, reads the files of all of them (MultiProcessCollector).
Counters and histograms add up; each gauge says how its workers' values combine (the
`multiprocess_mode` below, docs/decisions/13A1-workers.md). Gauges computed by scrape hooks
would only be fresh in the worker that answers, so in that mode every worker also runs the hooks
on a timer (start_publishing).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess as _multiprocess

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How often each worker publishes its scrape-hook gauges in multiprocess mode: a scrape sees
# another worker's values at most this old.
MULTIPROCESS_PUBLISH_INTERVAL_S = 1.0


# prometheus_client's multiprocess module has no annotations: typed views of what we call.
_collect_from_files = cast(Callable[[CollectorRegistry], object],
                           _multiprocess.MultiProcessCollector)
_mark_dead = cast(Callable[[int, str], None], _multiprocess.mark_process_dead)


def multiprocess_dir() -> str | None:
    """The directory of the per-process metric files, when this process is one of several."""
    return os.environ.get(MULTIPROC_DIR_ENV) or None


def mark_process_dead(pid: int, directory: str) -> None:
    """Drop a dead worker's live gauges from `directory` (its counters stay: node totals never
    go backwards). Called by the supervisor when it reaps the worker."""
    _mark_dead(pid, directory)


# Turn latencies, in seconds: fine steps where voice SLOs sit (0.3-1 s), coarse beyond.
TURN_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# Ingest lag, in seconds: fine steps from 1 to 100 ms (issue 15: p99 < 20 ms), coarse beyond.
INGEST_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)

class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.multiprocess = registry is None and multiprocess_dir() is not None
        if self.multiprocess:
            # The metrics below still register in a registry of their own (names stay unique),
            # but what /metrics exposes (`self.registry`) is read from every worker's files.
            self.registry = CollectorRegistry()
            _collect_from_files(self.registry)
        # Gauges summed over live sessions are computed when scraped, not kept up to date.
        self.scrape_hooks: list[Callable[[], None]] = []
        self._publisher: asyncio.TimerHandle | None = None
        # Per worker (a `pid` label in multiprocess mode): how the kernel spread the load.
        self.sessions_active = Gauge(
            "streamgate_sessions_active", "Live sessions", ["kind"], registry=r,
            multiprocess_mode="liveall",
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
            registry=r, multiprocess_mode="liveall",
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
            ["stage"], registry=r, multiprocess_mode="livesum",
        )
        self.stage_seconds = Histogram(
            "streamgate_stage_seconds", "Time spent per stage batch", ["stage"], registry=r,
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
        )
        # Issue 15: how far the ingest stage runs behind the socket (a loaded loop shows here
        # before it drops audio). Per ingest step, the oldest frame it took in.
        self.ingest_lag = Histogram(
            "streamgate_ingest_lag_seconds",
            "A frame's read from the socket to its pass through the VAD", ["kind"], registry=r,
            buckets=INGEST_LAG_BUCKETS,
        )
        self.engine_seconds = Histogram(
            "streamgate_engine_seconds", "Engine call latency", ["model", "op"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        # Per turn (issue 17): what a latency SLO is written on, e.g. "p99 end of speech to
        # final < 700 ms" is one histogram_quantile over this.
        self.asr_final_latency = Histogram(
            "streamgate_asr_final_latency_seconds",
            "End of speech (the VAD ended the utterance) to its final transcript", ["model"],
            registry=r, buckets=TURN_BUCKETS,
        )
        self.tts_first_audio = Histogram(
            "streamgate_tts_first_audio_seconds",
            "A TTS chunk taken for synthesis to its first audio frame on the wire", ["model"],
            registry=r, buckets=TURN_BUCKETS,
        )
        # Issue 17: a phone call's turn, what its caller waits through.
        self.telephony_turn_latency = Histogram(
            "streamgate_telephony_turn_latency_seconds",
            "Caller stops speaking (last voiced audio; a keypad turn: its digits taken) to the "
            "agent's first audio sent to the provider", ["agent"], registry=r,
            buckets=TURN_BUCKETS,
        )
        self.asr_queue = Histogram(
            "streamgate_asr_queue_seconds",
            "Per utterance: time its engine requests waited in the micro-batcher", ["model"],
            registry=r, buckets=(0.0, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                 1.0, 2.5),
        )
        self.tts_real_time_factor = Histogram(
            "streamgate_tts_real_time_factor",
            "Per TTS chunk: synthesis time over the audio's duration (below 1: faster than "
            "real time)", ["model"], registry=r,
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0),
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
            ["model"], registry=r, multiprocess_mode="livemax",  # open in any worker
        )
        self.credit_outstanding = Gauge(
            "streamgate_credit_outstanding_bytes", "Audio credit held by clients", registry=r,
            multiprocess_mode="livesum",
        )
        # TTS, the other direction: text waiting for the engine, audio waiting for the client.
        self.tts_pending_chars = Gauge(
            "streamgate_tts_pending_chars", "Text accepted and not yet synthesized, summed over "
            "TTS sessions", registry=r, multiprocess_mode="livesum",
        )
        self.tts_playback_credit = Gauge(
            "streamgate_tts_playback_credit_bytes", "Playback credit TTS clients have granted "
            "and the server has not yet filled", registry=r, multiprocess_mode="livesum",
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
            registry=r, multiprocess_mode="livemax",  # the worst state of any worker
        )
        self.llm_attempts = Counter(
            "streamgate_llm_upstream_attempts_total",
            "Calls to LLM upstreams by outcome (ok, retryable, malformed, rejected)",
            ["provider", "outcome"], registry=r,
        )
        self.llm_first_token = Histogram(
            "streamgate_llm_first_token_seconds",
            "An LLM upstream attempt that answered: request sent -> first token (a stream's "
            "first chunk) or the whole answer (mode=complete)", ["provider", "mode"],
            registry=r, buckets=TURN_BUCKETS,
        )
        self.llm_tokens = Counter(
            "streamgate_llm_tokens_total", "Tokens settled for LLM requests", ["model"],
            registry=r,
        )
        self.llm_cached_tokens = Counter(
            "streamgate_llm_cached_prompt_tokens_total",
            "Prompt tokens the upstream reported served from its prompt cache "
            "(usage.prompt_tokens_details.cached_tokens)", ["model"], registry=r,
        )
        self.llm_tokens_per_second = Histogram(
            "streamgate_llm_output_tokens_per_second",
            "An answered LLM request's completion tokens over its whole duration (request -> "
            "last token)", ["model"], registry=r,
            buckets=(5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000),
        )

    def before_scrape(self) -> None:
        for hook in self.scrape_hooks:
            hook()

    def start_publishing(self, interval_s: float = MULTIPROCESS_PUBLISH_INTERVAL_S) -> None:
        """In multiprocess mode, run the scrape hooks every `interval_s` from the running loop
        (a timer, not a task: nothing to await at shutdown). A no-op in a single process, where
        the scrape itself runs them."""
        if not self.multiprocess or self._publisher is not None:
            return
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.before_scrape()
            self._publisher = loop.call_later(interval_s, tick)

        tick()

    def stop_publishing(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            self._publisher = None
