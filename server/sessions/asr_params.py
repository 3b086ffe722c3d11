"""ASR session parameters: from the upgrade's query string or a `config` message, validated once."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import get_args

import msgspec

from streamgate_protocol.messages import Config, Encoding, Overflow, VadMode

MIN_RATE, MAX_RATE = 8000, 48000
ENCODINGS: tuple[str, ...] = get_args(Encoding)
VAD_MODES: tuple[str, ...] = get_args(VadMode)
OVERFLOWS: tuple[str, ...] = get_args(Overflow)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class BadParams(ValueError):
    """Rejected before 101 as HTTP 400 `bad_request`, or after it as close 4400 `bad_config`."""


class AsrParams(msgspec.Struct, kw_only=True, frozen=True):
    model: str
    language: str = "en-US"
    encoding: Encoding = "pcm_s16le"
    sample_rate: int = 16000
    channels: int = 1
    interim_results: bool = True
    endpointing_ms: int = 500
    vad: VadMode = "medium"
    overflow: Overflow = "block"
    metrics: bool = False  # a `metrics` message after each final (docs/protocol.md)

    @property
    def bytes_per_ms(self) -> float:
        width = 2 if self.encoding in ("pcm_s16le", "wav") else 1
        return self.sample_rate * width * self.channels / 1000


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise BadParams(f"{name} must be an integer, got {raw[:32]!r}") from None


def _bool(name: str, raw: str) -> bool:
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise BadParams(f"{name} must be true or false, got {raw[:32]!r}")


def _choice(name: str, raw: str, allowed: tuple[str, ...]) -> str:
    if raw not in allowed:
        raise BadParams(f"{name} must be one of {', '.join(allowed)}; got {raw[:32]!r}")
    return raw


def _check(p: AsrParams, models: Collection[str]) -> AsrParams:
    if p.model not in models:
        raise BadParams(f"unknown model {p.model[:40]!r}; available: {', '.join(sorted(models))}")
    if not MIN_RATE <= p.sample_rate <= MAX_RATE:
        raise BadParams(f"sample_rate must be {MIN_RATE}-{MAX_RATE}, got {p.sample_rate}")
    if p.channels != 1 and p.encoding != "wav":
        raise BadParams("channels must be 1 (a WAV stream may carry more; its header says so)")
    if not 10 <= p.endpointing_ms <= 10000:
        raise BadParams(f"endpointing_ms must be 10-10000, got {p.endpointing_ms}")
    if not 0 < len(p.language) <= 16:
        raise BadParams("language must be a short tag such as en-US")
    return p


def params_from_query(
    query: Mapping[str, str], *, default_model: str, models: Collection[str]
) -> AsrParams:
    kwargs: dict[str, object] = {"model": query.get("model", default_model)}
    for name in ("language",):
        if name in query:
            kwargs[name] = query[name]
    if "encoding" in query:
        kwargs["encoding"] = _choice("encoding", query["encoding"], ENCODINGS)
    if "vad" in query:
        kwargs["vad"] = _choice("vad", query["vad"], VAD_MODES)
    if "overflow" in query:
        kwargs["overflow"] = _choice("overflow", query["overflow"], OVERFLOWS)
    for name in ("sample_rate", "channels", "endpointing_ms"):
        if name in query:
            kwargs[name] = _int(name, query[name])
    if "interim_results" in query:
        kwargs["interim_results"] = _bool("interim_results", query["interim_results"])
    if "metrics" in query:
        kwargs["metrics"] = _bool("metrics", query["metrics"])
    return _check(AsrParams(**kwargs), models)  # type: ignore[arg-type]


def params_with_config(base: AsrParams, msg: Config, *, models: Collection[str]) -> AsrParams:
    changes = {
        f: getattr(msg, f)
        for f in msg.__struct_fields__
        if getattr(msg, f) is not None
    }
    return _check(msgspec.structs.replace(base, **changes), models)
