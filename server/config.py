"""Typed configuration: config/default.toml, then --config FILE, then STREAMGATE_* env vars.

Every layer is merged as plain dicts and decoded once into msgspec Structs, so a bad value
fails at start-up with the path of the offending key, not later in a session.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from server.flow_control.http_body import DEFAULT_BODY_TIMEOUT_S
from server.flow_control.recording import (
    DEFAULT_MAX_RECORDING_BYTES,
    DEFAULT_RETENTION_DAYS,
    MIN_RECORDING_BYTES,
)

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "default.toml"
ENV_PREFIX = "STREAMGATE_"


class ConfigError(Exception):
    """A configuration value is missing, malformed or out of range."""


class Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(Base):
    host: str = "127.0.0.1"
    ws_port: int = 8765
    http_port: int = 8080
    # `streamgate serve` worker processes sharing both ports (server/supervisor); 0: one per
    # available core; 1: a single process and no supervisor. `--workers` overrides it.
    workers: int = 0
    max_frame_bytes: int = 65536
    max_connections: int = 10000
    handshake_timeout_s: float = 5.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    idle_timeout_s: float = 10.0
    write_high_water_bytes: int = 65536
    write_low_water_bytes: int = 16384
    # SIGTERM: a live session runs on up to its kind's drain timeout, then is told to drain
    # (finals, `error draining` with its resume token, 1001); telephony calls cannot resume, so
    # they get longer (docs/deploy.md, "Readiness and drain"; docs/decisions/13M2).
    drain_timeout_s: float = 10.0
    telephony_drain_timeout_s: float = 600.0
    # SIGTERM: listeners keep answering (503 draining) at least this long, so load balancers
    # polling /readyz see the node leave; capped at drain_timeout_s (docs/decisions/0602)
    drain_notice_s: float = 10.0
    housekeeping_interval_s: float = 0.25
    # HTTP port: a request whose body stops arriving for this long (while its handler waits for
    # it) gets 408 and its connection is closed (server/flow_control/http_body.py)
    http_body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S


class LoggingConfig(Base):
    level: str = "INFO"
    json: bool = True


class TracingConfig(Base):
    """OpenTelemetry traces (server/telemetry/tracing.py, docs/observability.md)."""

    enabled: bool = False
    sample_ratio: float = 1.0  # of traces, a client's too (unless follow_client_sampled)
    # A client's `traceparent` with its sampled flag set is traced whatever the ratio: any
    # client (before its key is checked) could then have its sessions traced at full cost.
    follow_client_sampled: bool = False
    always_sample_errors: bool = True  # error spans of unsampled traces are exported too
    exporter: Literal["none", "console", "otlp"] = "none"
    endpoint: str = ""  # OTLP/HTTP traces URL; empty: the exporter's default (or OTEL_* env)


class AuthConfig(Base):
    # SHA-256 hex digests of accepted keys. The billing layer replaces this with real tenants.
    key_sha256: list[str] = msgspec.field(default_factory=list)
    allow_anonymous: bool = True


class AsrSessionConfig(Base):
    default_model: str = "sphinx-en"
    ingest_queue_ms: int = 2000
    invoke_queue_ms: int = 10000
    max_control_messages: int = 64
    max_outbound_messages: int = 512
    usage_interval_s: float = 5.0
    preroll_ms: int = 300
    max_utterance_ms: int = 30000
    vad_frame_ms: int = 20
    resample_quality: Literal["QQ", "LQ", "MQ", "HQ", "VHQ"] = "HQ"
    max_wav_header_bytes: int = 4096
    # How long a session cut off (drain, lost connection, a node that died) can be resumed with
    # its `resume_token` (docs/protocol.md, "Resuming a session"); 0: no resume tokens.
    resume_window_s: float = 60.0


class PocketsphinxModelConfig(Base, tag="pocketsphinx", tag_field="engine"):
    language: str = "en-US"
    max_concurrency: int = 2
    interim_every_ms: int = 400
    price_micros_per_minute: int = 6000
    call_timeout_s: float = 30.0  # one worker request (and worker start-up); then it is killed
    stop_timeout_s: float = 2.0  # at shutdown, wait this long for a worker to exit on EOF


class SyntheticModelConfig(Base, tag="synthetic", tag_field="engine"):
    latency_base_ms: float = 5.0
    latency_per_item_ms: float = 0.5
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_pending: int = 4096
    failure_rate: float = 0.0
    seed: int = 0
    ms_per_word: int = 400
    price_micros_per_minute: int = 1000


class UpstreamModelConfig(Base, tag="upstream", tag_field="engine"):
    url: str
    upstream_model: str = "whisper-1"
    api_key_env: str = ""
    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.2
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    max_concurrency: int = 8
    price_micros_per_minute: int = 6000


AsrModelConfig = PocketsphinxModelConfig | SyntheticModelConfig | UpstreamModelConfig


class AsrConfig(Base):
    session: AsrSessionConfig = msgspec.field(default_factory=AsrSessionConfig)
    models: dict[str, AsrModelConfig] = msgspec.field(default_factory=dict)


class TtsSessionConfig(Base):
    default_model: str = "espeak-en"
    chunk_ms: int = 100  # fixed duration of every outbound audio chunk
    credit_ms: int = 2000  # ready.credit_bytes: this much audio at the session's encoding/rate
    max_text_chars: int = 20000  # text buffered ahead of synthesis; beyond it -> error
    # Text waiting for synthesis (buffered + chunked); at this much the session stops reading
    # its socket (server/flow_control/text_backlog.py)
    max_pending_chars: int = 20000
    usage_interval_s: float = 5.0
    # A TTS session cut off can be resumed this long (docs/protocol.md, "Resuming a session").
    resume_window_s: float = 60.0


class EspeakModelConfig(Base, tag="espeak", tag_field="engine"):
    voice: str = ""  # empty: derived from the session's language tag
    rate_wpm: int = 175
    max_chars: int = 400
    max_tokens: int | None = None
    max_concurrency: int = 4
    sample_rate: int = 22050
    price_micros_per_1k_chars: int = 15000


class SyntheticTtsConfig(Base, tag="synthetic", tag_field="engine"):
    ms_per_char: int = 60
    first_audio_ms: float = 20.0
    rtf: float = 0.05
    chunk_ms: int = 40
    sample_rate: int = 16000
    max_chars: int = 300
    max_tokens: int | None = None
    failure_rate: float = 0.0
    seed: int = 0
    price_micros_per_1k_chars: int = 1000


class UpstreamTtsConfig(Base, tag="upstream", tag_field="engine"):
    url: str
    upstream_model: str = "tts-1"
    voice: str = "alloy"
    api_key_env: str = ""
    response_format: str = "pcm"  # "pcm" (raw s16le at sample_rate) or "wav"
    sample_rate: int = 24000
    timeout_s: float = 30.0
    retries: int = 2
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    max_concurrency: int = 8
    max_chars: int = 4096
    max_tokens: int | None = None
    price_micros_per_1k_chars: int = 15000


# Tags only need to be distinct within one union, so "synthetic"/"upstream" repeat the ASR ones.
TtsModelConfig = EspeakModelConfig | SyntheticTtsConfig | UpstreamTtsConfig


class TtsConfig(Base):
    session: TtsSessionConfig = msgspec.field(default_factory=TtsSessionConfig)
    models: dict[str, TtsModelConfig] = msgspec.field(default_factory=dict)


class BillingConfig(Base):
    # Off: no wallets, sessions are priced but not charged, keys come from auth.key_sha256.
    enabled: bool = True
    # Empty: REDIS_URL / DATABASE_URL from the environment, else embedded servers started from
    # the system binaries in data_dir.
    redis_url: str = ""
    database_url: str = ""
    data_dir: str = ""
    embedded_redis_port: int = 6390
    embedded_postgres_port: int = 5440
    admin_token: str = ""
    lease_s: int = 30
    min_lease_s: int = 2
    low_balance_s: int = 60
    lease_chars: int = 2000
    min_lease_chars: int = 20
    low_balance_chars: int = 500
    run_flusher: bool = True
    # A dead flusher's unacknowledged usage is taken over by another once idle this long: longer
    # than any flush round, or a slow live flusher's entries would be flushed twice in parallel.
    flush_claim_idle_s: float = 30.0
    sweep_interval_s: float = 2.0
    key_cache_ttl_s: float = 10.0
    fallback_fraction: float = 0.5
    dev_tenant: bool = True
    dev_topup_micros: int = 10_000_000


class TelephonyAgentConfig(Base):
    """Who answers the caller (server/telephony/call/agents.py)."""

    kind: Literal["echo", "webhook", "chat"] = "echo"
    url: str = ""  # webhook: the POST target; chat: base URL of an OpenAI-compatible API
    model: str = ""  # chat: the upstream model name
    api_key_env: str = ""  # env var holding a bearer token for the webhook / chat API
    system_prompt: str = (
        "You are a helpful voice assistant on a phone call. Answer briefly, in plain sentences."
    )
    max_tokens: int = 200
    temperature: float = 0.7
    connect_timeout_s: float = 5.0
    first_text_timeout_s: float = 10.0  # from the request to the first piece of text
    read_timeout_s: float = 10.0  # longest gap between two pieces of a streamed reply
    total_timeout_s: float = 60.0  # a whole reply
    max_history: int = 20  # turns passed to the agent (oldest dropped first)

    def __post_init__(self) -> None:
        if self.kind in ("webhook", "chat") and not self.url:
            raise ValueError(f"telephony.agent.url is required for kind {self.kind!r}")


class TelephonyConfig(Base):
    asr_model: str = ""  # empty: asr.session.default_model
    tts_model: str = ""  # empty: tts.session.default_model
    voice: str = ""  # empty: the TTS model's default voice
    language: str = "en-US"
    vad: Literal["low", "medium", "high"] = "medium"
    endpointing_ms: int = 500
    start_timeout_s: float = 5.0  # no valid `start` (with a valid key) in time -> close 4001
    credit_ms: int = 1000  # outbound audio the provider may hold unacknowledged (mark echoes)
    chunk_ms: int = 100  # outbound audio per media message; a mark follows each
    dtmf_timeout_s: float = 1.5  # digits go to the agent after `#` or this much quiet
    pending_audio_ms: int = 2000  # inbound audio kept while the start's key is checked
    # soxr quality of the agent's speech from the TTS engine's rate to the call's (8 kHz G.711):
    # MQ is 50+ dB from HQ, far below G.711's own noise, and holds ~7 KiB per call, not ~80
    # (docs/decisions/15M1-telephony-tts-resample-quality.md).
    tts_resample_quality: Literal["QQ", "LQ", "MQ", "HQ", "VHQ", "HB"] = "HB"
    # The same for the caller's speech, 8 kHz up to the ASR engine's rate (decision 15M1).
    asr_resample_quality: Literal["QQ", "LQ", "MQ", "HQ", "VHQ", "HB"] = "HB"
    agent: TelephonyAgentConfig = msgspec.field(default_factory=TelephonyAgentConfig)

    def __post_init__(self) -> None:
        if not 10 <= self.endpointing_ms <= 10000:
            raise ValueError("telephony.endpointing_ms must be 10-10000")
        if self.chunk_ms < 20 or self.credit_ms < self.chunk_ms:
            raise ValueError("telephony: need chunk_ms >= 20 and credit_ms >= chunk_ms")
        if self.start_timeout_s <= 0 or self.dtmf_timeout_s <= 0:
            raise ValueError("telephony: start_timeout_s and dtmf_timeout_s must be positive")


class LlmProviderConfig(Base):
    """One OpenAI-compatible chat upstream (vLLM, llama.cpp server, a hosted API)."""

    name: str
    url: str  # base URL; requests go to {url}/v1/chat/completions
    api_key_env: str = ""  # env var with a bearer token; unset at start-up -> config error
    priority: int = 0  # lower is tried first; ties keep config order
    models: dict[str, str] = msgspec.field(default_factory=dict)  # public -> upstream name
    connect_timeout_s: float = 3.0
    # Request sent -> response headers (and, for streams, the first event); also the longest
    # gap allowed between two streamed events.
    first_byte_timeout_s: float = 10.0
    timeout_s: float = 60.0  # one whole attempt, streamed answers included
    retries: int = 1  # extra attempts on this provider for connection errors, timeouts, 429, 5xx
    backoff_s: float = 0.1
    breaker_failures: int = 3
    breaker_reset_s: float = 30.0
    max_concurrency: int = 64  # requests in flight to this provider; more wait (back pressure)

    def __post_init__(self) -> None:
        if not self.name or not self.url:
            raise ValueError("llm.providers: name and url are required")
        if min(self.connect_timeout_s, self.first_byte_timeout_s, self.timeout_s) <= 0:
            raise ValueError(f"llm.providers.{self.name}: timeouts must be positive")
        if self.retries < 0 or self.breaker_failures < 1 or self.max_concurrency < 1:
            raise ValueError(
                f"llm.providers.{self.name}: need retries >= 0, breaker_failures >= 1,"
                " max_concurrency >= 1"
            )


class LlmConfig(Base):
    """/v1/chat/completions and /v1/translate: a proxy over `providers` (none by default: the
    endpoints then answer 503 no_upstream)."""

    providers: list[LlmProviderConfig] = msgspec.field(default_factory=list)
    price_micros_per_1k_tokens: dict[str, int] = msgspec.field(default_factory=dict)
    request_deadline_s: float = 60.0  # a whole request: every attempt, backoff and stream
    default_max_tokens: int = 1024  # reserved (and sent upstream) when a request sets none
    max_tokens_limit: int = 16384  # larger max_tokens -> 400
    chars_per_token: float = 3.0  # prompt estimate: ceil(chars / this)
    max_request_bytes: int = 1024 * 1024  # larger bodies -> 413
    translate_model: str = ""  # empty: the first configured public model
    idempotency_ttl_s: float = 600.0
    idempotency_max_entries: int = 10000

    def __post_init__(self) -> None:
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("llm.providers: provider names must be unique")
        if self.request_deadline_s <= 0 or self.chars_per_token <= 0:
            raise ValueError("llm: request_deadline_s and chars_per_token must be positive")
        if not 0 < self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError("llm: need 0 < default_max_tokens <= max_tokens_limit")
        if self.max_request_bytes < 1024:
            raise ValueError("llm.max_request_bytes must be at least 1024")


class VisionUpstreamConfig(Base):
    """An OpenAI-compatible chat/completions endpoint used for structured extraction."""

    enabled: bool = False
    url: str = ""  # base URL; the client posts to {url}/v1/chat/completions
    model: str = ""  # the upstream's model name
    api_key_env: str = ""  # env var holding a bearer token
    connect_timeout_s: float = 5.0
    timeout_s: float = 60.0  # one answer; vision models take seconds per page
    retries: int = 1  # per answer, for failures that may pass (connect, timeout, 429, 5xx)
    backoff_s: float = 0.5
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    max_concurrency: int = 4
    max_tokens: int = 2048
    temperature: float = 0.0
    # response_format {"type": "json_schema"}: off for servers that reject the field.
    json_schema_format: bool = True

    def __post_init__(self) -> None:
        if self.enabled and (not self.url or not self.model):
            raise ValueError("vision upstream: url and model are required when enabled")
        if self.retries < 0 or self.max_concurrency < 1 or self.timeout_s <= 0:
            raise ValueError("vision upstream: need retries >= 0, max_concurrency >= 1, "
                             "timeout_s > 0")


class VisionConfig(Base):
    """POST /v1/vision/extract: OCR (tesseract), layout, optional schema-driven extraction."""

    model: str = "vision-ocr"  # price plan name for billing (unit "pages")
    languages: str = "eng+hin"  # tesseract language packs used when a request names none
    dpi: int = 200  # PDF rendering resolution (lowered for huge pages, see max_page_pixels)
    max_pages: int = 20
    max_upload_bytes: int = 20 * 1024 * 1024
    max_page_pixels: int = 40_000_000
    ocr_concurrency: int = 2  # pages rendered + OCRed at once in this process
    ocr_timeout_s: float = 60.0  # one tesseract run
    render_timeout_s: float = 60.0  # one pdfinfo / pdftoppm run
    psm: int = 11  # tesseract page segmentation mode (11: sparse text, see server/vision/ocr.py)
    price_micros_per_page: int = 2000
    max_schema_bytes: int = 65536
    extraction_attempts: int = 3  # answers asked of one model: the first plus repairs
    max_vlm_pages: int = 4  # page images sent to the vision model
    max_text_chars: int = 30000  # OCR text sent to the text model
    idempotency_ttl_s: float = 3600.0  # answers kept for Idempotency-Key replays...
    idempotency_max_entries: int = 256  # ...at most this many (a long PDF's answer is MBs)
    vlm: VisionUpstreamConfig = msgspec.field(default_factory=VisionUpstreamConfig)
    text_model: VisionUpstreamConfig = msgspec.field(default_factory=VisionUpstreamConfig)

    def __post_init__(self) -> None:
        if not 50 <= self.dpi <= 600:
            raise ValueError("vision.dpi must be 50-600")
        if self.max_pages < 1 or self.max_upload_bytes < 1024 or self.ocr_concurrency < 1:
            raise ValueError("vision: need max_pages >= 1, max_upload_bytes >= 1024 and "
                             "ocr_concurrency >= 1")
        if not 0 <= self.psm <= 13 or self.extraction_attempts < 1 or self.max_vlm_pages < 1:
            raise ValueError("vision: need psm 0-13, extraction_attempts >= 1, "
                             "max_vlm_pages >= 1")


class RecordingConfig(Base):
    # Session recording (record=true, docs/recording.md): off unless enabled, with a directory.
    enabled: bool = False
    directory: str = ""
    retention_days: float = DEFAULT_RETENTION_DAYS
    max_bytes: int = DEFAULT_MAX_RECORDING_BYTES  # per recording (flow_control/recording.py)
    # Tenants whose every ASR/TTS session is recorded (a session may still say record=false).
    tenants: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.enabled and not self.directory:
            raise ValueError("recording.directory must be set when recording.enabled is true")
        if self.tenants and not self.enabled:
            raise ValueError("recording.tenants needs recording.enabled = true")
        if not self.retention_days > 0:
            raise ValueError("recording.retention_days must be positive")
        if self.max_bytes < MIN_RECORDING_BYTES:
            raise ValueError(f"recording.max_bytes must be at least {MIN_RECORDING_BYTES}")


class Config(Base):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    asr: AsrConfig = msgspec.field(default_factory=AsrConfig)
    billing: BillingConfig = msgspec.field(default_factory=BillingConfig)
    tts: TtsConfig = msgspec.field(default_factory=TtsConfig)
    telephony: TelephonyConfig = msgspec.field(default_factory=TelephonyConfig)
    vision: VisionConfig = msgspec.field(default_factory=VisionConfig)
    llm: LlmConfig = msgspec.field(default_factory=LlmConfig)
    recording: RecordingConfig = msgspec.field(default_factory=RecordingConfig)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_layer(environ: dict[str, str]) -> dict[str, Any]:
    """STREAMGATE_SERVER__WS_PORT=9000 -> {"server": {"ws_port": 9000}}.

    Values are parsed as TOML scalars (numbers, booleans, quoted strings, arrays); anything that
    is not valid TOML is taken as a bare string.
    """
    layer: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = layer
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return layer


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _validate(cfg: Config) -> None:
    s = cfg.server
    if not 0 < s.write_low_water_bytes < s.write_high_water_bytes:
        raise ConfigError("server.write_low_water_bytes must be > 0 and < write_high_water_bytes")
    if s.max_frame_bytes < 1024:
        raise ConfigError("server.max_frame_bytes must be at least 1024")
    if s.workers < 0:
        raise ConfigError("server.workers must be >= 0 (0: one per available core)")
    if not s.http_body_timeout_s > 0:
        raise ConfigError("server.http_body_timeout_s must be positive")
    a = cfg.asr.session
    if a.vad_frame_ms not in (10, 20, 30):
        raise ConfigError("asr.session.vad_frame_ms must be 10, 20 or 30")
    # 40 ms is the smallest window that still grants credit per 10 ms quarter (benchmarks use it).
    if a.ingest_queue_ms < 40 or a.invoke_queue_ms < 100:
        raise ConfigError(
            "asr.session.ingest_queue_ms must be >= 40 and invoke_queue_ms >= 100"
        )
    if not 0.0 <= cfg.tracing.sample_ratio <= 1.0:
        raise ConfigError("tracing.sample_ratio must be within 0..1")
    b = cfg.billing
    if not 0 < b.min_lease_s <= b.lease_s:
        raise ConfigError("billing: need 0 < min_lease_s <= lease_s")
    if not 0 < b.fallback_fraction <= 1:
        raise ConfigError("billing.fallback_fraction must be in (0, 1]")
    if not cfg.asr.models:
        raise ConfigError("asr.models: at least one model must be configured")
    if cfg.tts.models and cfg.tts.session.default_model not in cfg.tts.models:
        raise ConfigError(
            f"tts.session.default_model {cfg.tts.session.default_model!r} is not in tts.models"
        )
    if a.default_model not in cfg.asr.models:
        raise ConfigError(f"asr.session.default_model {a.default_model!r} is not in asr.models")


def load_config(
    path: Path | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    data = _read_toml(DEFAULT_CONFIG_PATH)
    if path is not None:
        data = _merge(data, _read_toml(path))
    data = _merge(data, _env_layer(dict(os.environ if environ is None else environ)))
    if overrides:
        data = _merge(data, overrides)
    try:
        cfg = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    _validate(cfg)
    return cfg
