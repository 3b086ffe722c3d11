"""`/v1/telephony/twilio`: admission of provider media streams (Twilio, Exotel, Plivo, Telnyx).

Providers connect from their own infrastructure and most cannot set headers, so there are two
ways in (docs/protocol.md, "Authentication and admission"):

* a key at the upgrade (Authorization / token subprotocol / ?api_key): the router has already
  authenticated it; the meters are opened here, so 402/429/503 are plain HTTP answers as for
  every other endpoint;
* no key at the upgrade: the upgrade is accepted (`admit_without_key`) and the key must come in
  the `start` event's `customParameters.api_key` (Plivo: `apikey`, in its extra headers); the
  session authenticates it, applies the admission policy and opens the meters then.

One call = two meters: caller audio (ASR model, `audio_ms`) and agent speech (TTS model,
`characters`), with session ids `<id>` and `<id>-tts` (each has its own idempotency keys).
"""

from __future__ import annotations

import contextlib
import logging
import uuid

from server.billing.auth import Authenticator, Principal
from server.billing.meter import METER_ERRORS, MeterFactory, SessionMeter
from server.config import Config, ConfigError
from server.models.base import Synthesizer
from server.protocol.admission import AdmissionPolicy
from server.protocol.errors import Rejected, rejection
from server.sessions.asr_runner import AsrEndpoint
from server.sessions.host import SessionHost
from server.sessions.upgrade import Admitted, SessionSocket, UpgradeRequest
from server.telemetry.metrics import Metrics
from server.telephony.call.agents import Agent, build_agent
from server.telephony.call.meters import CallMeters, MeterRefused, ObservedMeter
from server.telephony.call.session import TelephonySession
from server.telephony.providers import PROVIDERS

log = logging.getLogger("streamgate.telephony")
KIND = "telephony"
AUDIO_MS = "audio_ms"
CHARACTERS = "characters"


class TelephonyEndpoint:
    kind = KIND

    def __init__(
        self,
        *,
        config: Config,
        asr: AsrEndpoint,
        tts_engines: dict[str, Synthesizer],
        meters: MeterFactory,
        authenticator: Authenticator,
        server: SessionHost,
        metrics: Metrics,
        agent: Agent | None = None,
        policy: AdmissionPolicy | None = None,
    ) -> None:
        cfg = config.telephony
        self.config = config
        self.asr = asr
        self.asr_model = cfg.asr_model or config.asr.session.default_model
        self.tts_model = cfg.tts_model or config.tts.session.default_model
        if self.asr_model not in asr.engines:
            raise ConfigError(f"telephony.asr_model {self.asr_model!r} is not in asr.models")
        if self.tts_model not in tts_engines:
            raise ConfigError(f"telephony.tts_model {self.tts_model!r} is not a TTS engine")
        self.tts_engine = tts_engines[self.tts_model]
        self.meters = meters
        self.authenticator = authenticator
        self.server = server
        # Per-key checks for a key that comes in-band (the router applies it at the upgrade).
        self.policy = policy
        self.metrics = metrics
        self.agent = agent if agent is not None else build_agent(cfg.agent)

    async def aclose(self) -> None:
        await self.agent.aclose()

    def _provider(self, upgrade: UpgradeRequest) -> str | Rejected | None:
        name = upgrade.query.get("provider")
        if name is None:
            return None  # detected from the first message
        name = name.strip().lower()
        if name not in PROVIDERS:
            return Rejected(400, "bad_request",
                            f"provider must be one of {', '.join(PROVIDERS)}")
        return name

    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        """The key came with the upgrade (already authenticated by the router)."""
        provider = self._provider(upgrade)
        if isinstance(provider, Rejected):
            return provider
        try:
            meters = await self.open_meters(principal)
        except MeterRefused as exc:
            return exc.rejected()
        return self._admitted(provider, principal, meters)

    async def admit_without_key(self, upgrade: UpgradeRequest) -> Admitted | Rejected:
        """No key at the upgrade: accept it; the `start` event must bring one (within
        `telephony.start_timeout_s`, else close 4001)."""
        provider = self._provider(upgrade)
        if isinstance(provider, Rejected):
            return provider
        return self._admitted(provider, None, None)

    def _admitted(self, provider: str | None, principal: Principal | None,
                  meters: CallMeters | None) -> Admitted:
        def start(conn: SessionSocket) -> TelephonySession:
            conn.error_frames = False  # a provider's socket takes only the provider's messages
            session = TelephonySession(self, conn, provider=provider, principal=principal,
                                       meters=meters)
            session.start()
            return session

        def cancel() -> None:
            if meters is not None:
                self.server.spawn(meters.settle())

        return Admitted(start=start, cancel=cancel)

    async def open_meters(self, principal: Principal) -> CallMeters:
        session_id = uuid.uuid4().hex
        asr = await self._open(session_id, principal, self.asr_model, AUDIO_MS)
        try:
            tts = await self._open(f"{session_id}-tts", principal, self.tts_model, CHARACTERS)
        except BaseException:
            with contextlib.suppress(Exception):
                await asr.settle()
            raise
        return CallMeters(session_id, ObservedMeter(asr), ObservedMeter(tts))

    async def _open(self, session_id: str, principal: Principal, model: str,
                    unit: str) -> SessionMeter:
        try:
            return await self.meters.open(session_id=session_id, principal=principal,
                                          model=model, unit=unit)
        except METER_ERRORS as exc:
            refused = rejection(exc)
            raise MeterRefused(refused.status, refused.code, refused.message,
                               refused.close_code, refused.headers) from exc
