"""Which sessions are recorded, decided at admission: `record=true` on the upgrade's query, or
every session of a tenant listed in `recording.tenants` (unless the session says
`record=false`). `RecordingEndpoint` stands in front of an endpoint (ASR, TTS) and, for a
recorded session only, puts the recording socket and handler around the session it starts;
an unrecorded one is started exactly as without it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from server.config import RecordingConfig
from server.flow_control.recording import RecordingBudget
from server.protocol.admission import Principal
from server.protocol.errors import Rejected, refuse
from server.recording.local import LocalRecordingStore
from server.recording.retention import RetentionSweeper
from server.recording.session import SessionRecording, record
from server.recording.store import RecordingStore
from server.sessions.upgrade import Admitted, SessionHandler, SessionSocket, UpgradeRequest
from streamgate_protocol.recording import Header

log = logging.getLogger("streamgate.recording")

RECORD_PARAM = "record"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
# Never written into a recording's header: a secret, and a token that only means something to
# the session that issued it.
_UNRECORDED_PARAMS = frozenset({"api_key", "resume_token"})


class BadRecordParam(ValueError):
    pass


def record_param(query: dict[str, str]) -> bool | None:
    """`record` as the client gave it: True, False, or None when absent."""
    raw = query.get(RECORD_PARAM)
    if raw is None:
        return None
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise BadRecordParam(f"record must be true or false, got {raw[:32]!r}")


class Recorder:
    """The recording policy of a node: off (no store), or a store, a byte bound per recording
    and the tenants whose every session is recorded."""

    def __init__(self, store: RecordingStore | None, *, max_bytes: int,
                 tenants: Collection[str] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.tenants = frozenset(tenants)
        self.clock = clock

    def wanted(self, query: dict[str, str], tenant_id: str) -> bool:
        """Whether this upgrade is to be recorded (raises BadRecordParam). A resumed connection
        is not: its recording could not be replayed as a session of its own."""
        asked = record_param(query)
        if "resume_token" in query:
            return False
        if asked is None:
            return tenant_id in self.tenants
        return asked

    def open(self, kind: str, upgrade: UpgradeRequest, tenant_id: str) -> SessionRecording | None:
        """A new recording, or None when the store cannot make one (logged; the session then
        runs unrecorded: a recording never stops a session)."""
        store = self.store
        if store is None:
            return None
        now = datetime.now(UTC)
        header = Header(
            recording_id=f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:16]}",
            kind=kind, path=upgrade.path,
            query={k: v for k, v in upgrade.query.items() if k not in _UNRECORDED_PARAMS},
            tenant_id=tenant_id, started_at=now.isoformat(timespec="milliseconds"),
            max_bytes=self.max_bytes)
        try:
            sink = store.open(header)
        except OSError:
            log.warning("cannot open a recording; the session runs unrecorded",
                        extra={"tenant_id": tenant_id}, exc_info=True)
            return None
        return SessionRecording(header, sink, RecordingBudget(self.max_bytes), self.clock)


class Endpoint(Protocol):
    """What the WebSocket router routes to (server/ws/server.py's Endpoint), as seen here."""

    @property
    def kind(self) -> str: ...

    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        ...


class RecordingEndpoint:
    def __init__(self, inner: Endpoint, recorder: Recorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self.kind = inner.kind

    async def admit(self, upgrade: UpgradeRequest, principal: Principal) -> Admitted | Rejected:
        try:
            wanted = self.recorder.wanted(upgrade.query, principal.tenant_id)
        except BadRecordParam as exc:
            return refuse("bad_request", str(exc))
        if wanted and self.recorder.store is None:
            return refuse("bad_request", "recording is not enabled on this server")
        decision = await self.inner.admit(upgrade, principal)
        if not wanted or isinstance(decision, Rejected):
            return decision
        start_session = decision.start
        recorder, kind, tenant_id = self.recorder, self.kind, principal.tenant_id

        def start(socket: SessionSocket) -> SessionHandler:
            recording = recorder.open(kind, upgrade, tenant_id)
            if recording is None:
                return start_session(socket)
            return record(start_session, socket, recording)

        return Admitted(start=start, cancel=decision.cancel)


def build_recorder(config: RecordingConfig) -> tuple[Recorder, RetentionSweeper | None]:
    """The node's recorder from `[recording]`, and the retention sweeper its store needs (none
    when recording is off)."""
    if not config.enabled:
        return Recorder(None, max_bytes=config.max_bytes), None
    store = LocalRecordingStore(Path(config.directory), config.retention_days)
    recorder = Recorder(store, max_bytes=config.max_bytes, tenants=config.tenants)
    return recorder, RetentionSweeper(store)
