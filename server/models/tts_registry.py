"""Builds the configured TTS engines and runs their lifecycle as a group."""

from __future__ import annotations

from collections.abc import Mapping

from server.config import (
    EspeakModelConfig,
    SyntheticTtsConfig,
    TtsModelConfig,
    UpstreamTtsConfig,
)
from server.models import registry
from server.models.base import Synthesizer
from server.models.tts_espeak import EspeakSynthesizer
from server.models.tts_synthetic import SyntheticSynthesizer
from server.models.tts_upstream import UpstreamSynthesizer


def build_synthesizer(name: str, cfg: TtsModelConfig) -> Synthesizer:
    if isinstance(cfg, EspeakModelConfig):
        return EspeakSynthesizer(name, cfg)
    if isinstance(cfg, SyntheticTtsConfig):
        return SyntheticSynthesizer(name, cfg)
    if isinstance(cfg, UpstreamTtsConfig):
        return UpstreamSynthesizer(name, cfg)
    raise TypeError(f"tts.models.{name}: unsupported engine config {type(cfg).__name__}")


def build_synthesizers(models: Mapping[str, TtsModelConfig]) -> dict[str, Synthesizer]:
    """One shared engine per configured model; nothing is started (no I/O) here."""
    return {name: build_synthesizer(name, cfg) for name, cfg in models.items()}


async def start_all(synthesizers: Mapping[str, Synthesizer]) -> None:
    """Start in order; on a failure close those already started and re-raise."""
    await registry.start_all(synthesizers, kind="tts")


async def aclose_all(synthesizers: Mapping[str, Synthesizer]) -> None:
    """Close every engine, logging (not raising) individual failures."""
    await registry.aclose_all(synthesizers, kind="tts")
