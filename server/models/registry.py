"""Builds the configured ASR engines and runs their lifecycle as a group."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from server.config import (
    AsrModelConfig,
    PocketsphinxModelConfig,
    SyntheticModelConfig,
    UpstreamModelConfig,
)
from server.models.base import Transcriber
from server.models.pocketsphinx_engine import PocketsphinxTranscriber
from server.models.synthetic import SyntheticTranscriber
from server.models.upstream import UpstreamTranscriber
from server.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What start_all/aclose_all need: Transcriber, Synthesizer, ... all qualify."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


def build_transcriber(
    name: str, cfg: AsrModelConfig, metrics: Metrics | None = None
) -> Transcriber:
    if isinstance(cfg, PocketsphinxModelConfig):
        return PocketsphinxTranscriber(name, cfg)
    if isinstance(cfg, SyntheticModelConfig):
        on_batch = None
        if metrics is not None:
            sizes = metrics.batch_size.labels(name)
            seconds = metrics.engine_seconds.labels(name, "batch")

            def on_batch(size: int, elapsed: float) -> None:
                sizes.observe(size)
                seconds.observe(elapsed)

        return SyntheticTranscriber(name, cfg, on_batch=on_batch)
    if isinstance(cfg, UpstreamModelConfig):
        return UpstreamTranscriber(name, cfg)
    raise TypeError(f"asr.models.{name}: unsupported engine config {type(cfg).__name__}")


def build_transcribers(
    models: Mapping[str, AsrModelConfig], metrics: Metrics | None = None
) -> dict[str, Transcriber]:
    """One shared engine per configured model; nothing is started (no I/O) here."""
    engines = {name: build_transcriber(name, cfg, metrics) for name, cfg in models.items()}
    if metrics is not None:
        metrics.scrape_hooks.append(lambda: _publish_breakers(engines, metrics))
    return engines


def _publish_breakers(engines: Mapping[str, Transcriber], metrics: Metrics) -> None:
    for name, engine in engines.items():
        if isinstance(engine, UpstreamTranscriber):
            metrics.breaker_open.labels(name).set(1 if engine.breaker_state == "open" else 0)


async def start_all(transcribers: Mapping[str, Engine], *, kind: str = "asr") -> None:
    """Start engines in order; if one fails, close those already started and re-raise.

    Sequential on purpose: start-up cost is a few hundred ms at most, and a failure leaves a
    clear picture of which engine broke. `kind` only labels the log lines ("asr", "tts").
    """
    started: dict[str, Engine] = {}
    for name, engine in transcribers.items():
        try:
            await engine.start()
        except BaseException:
            log.exception("%s engine %s failed to start", kind, name)
            await aclose_all(started, kind=kind)
            raise
        started[name] = engine


async def aclose_all(transcribers: Mapping[str, Engine], *, kind: str = "asr") -> None:
    """Close every engine, even if some fail to close (each failure is logged)."""
    for name, engine in transcribers.items():
        try:
            await engine.aclose()
        except Exception:
            log.exception("%s engine %s failed to close", kind, name)
