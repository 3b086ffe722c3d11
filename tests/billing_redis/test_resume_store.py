"""The resume store (server/sessions/resume.py, resume_redis.py): a resume claims a session
once per epoch, a writer with an older epoch is refused, a finished session is forgotten, a
point expires, another tenant never sees one; the same rules in memory and in Redis (one server
and a real Redis Cluster: this package runs every test on both); a save that reaches the store
after the session was forgotten is refused."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import pytest

from server.billing.redis_client import connect
from server.sessions.asr_params import AsrParams
from server.sessions.resume import AnyResumePoint, MemoryResumeStore, ResumePoint, ResumeStore
from server.sessions.resume_redis import RedisResumeStore, resume_key
from server.sessions.resume_writer import ResumeWriter, SaveOutcome
from streamgate_protocol import messages as m


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[ResumeStore]:
    if request.param == "memory":
        yield MemoryResumeStore()
        return
    client = connect(redis_url)
    try:
        yield RedisResumeStore(client)
    finally:
        await client.aclose()


def point(epoch: int = 0, offset: int = 0, tenant: str = "acme") -> ResumePoint:
    final = m.Transcript(utterance_id=1, is_final=True, text="hello", start_ms=0, end_ms=400)
    return ResumePoint(session_id="s1", tenant_id=tenant, params=AsrParams(model="synthetic"),
                       epoch=epoch, offset=offset, at_ms=offset // 32, next_utterance_id=2,
                       billed_offset=offset, finals=[(1, final)])


async def test_a_resume_claims_the_point_once_and_the_old_writer_is_refused(
        store: ResumeStore) -> None:
    token = uuid.uuid4().hex
    assert await store.save(token, point(offset=6400), 60)
    claimed = await store.claim(token, "acme", 60)
    assert isinstance(claimed, ResumePoint) and claimed.epoch == 1
    assert claimed.offset == 6400 and claimed.finals == point().finals  # round trip, typed
    assert not await store.save(token, point(epoch=0, offset=9600), 60)  # superseded
    assert await store.save(token, point(epoch=1, offset=9600), 60)  # the new holder writes
    again = await store.claim(token, "acme", 60)
    assert isinstance(again, ResumePoint) and again.epoch == 2 and again.offset == 9600


async def test_another_tenant_an_unknown_token_and_a_finished_session_find_nothing(
        store: ResumeStore) -> None:
    token = uuid.uuid4().hex
    assert await store.claim(token, "acme", 60) is None
    assert await store.save(token, point(), 60)
    assert await store.claim(token, "intruder", 60) is None
    await store.forget(token, epoch=5, ttl_s=60)  # not the holder: nothing happens
    claimed = await store.claim(token, "acme", 60)
    assert claimed is not None
    await store.forget(token, claimed.epoch, 60)
    assert await store.claim(token, "acme", 60) is None
    # The finished session's own writer is refused from now on, so it cannot bring it back.
    assert not await store.save(token, point(epoch=claimed.epoch, offset=3200), 60)
    assert await store.claim(token, "acme", 60) is None


@pytest.fixture(params=["memory", "redis"])
async def held_store(request: pytest.FixtureRequest,
                     redis_url: str) -> AsyncIterator[ResumeStore]:
    """A store whose saves wait until `aclose()` (Redis: a batch window that never ends by
    itself; memory: a save stored when its task runs)."""
    if request.param == "memory":
        yield MemoryResumeStore()
        return
    client = connect(redis_url)
    try:
        yield RedisResumeStore(client, save_window_s=60.0)
    finally:
        await client.aclose()


@pytest.mark.parametrize("saved_before", [False, True])
async def test_a_save_still_waiting_when_the_session_is_forgotten_does_not_bring_it_back(
        held_store: ResumeStore, saved_before: bool) -> None:
    """The session ends for good (close 1000, 4002) while its last save waits in the batch:
    FORGET goes straight out, the save after it. The save is refused and nothing is claimed,
    whether the session had a point stored already or not (its first save was the one held)."""
    token = uuid.uuid4().hex
    if saved_before:
        early = asyncio.ensure_future(held_store.save(token, point(offset=0), 60))
        await asyncio.sleep(0)
        await held_store.aclose()
        assert await early
    saving = asyncio.ensure_future(held_store.save(token, point(offset=3200), 60))
    await asyncio.sleep(0)  # the save is made (Redis: it waits in the batch)
    if isinstance(held_store, RedisResumeStore):
        assert not saving.done()
    await held_store.forget(token, 0, 60)
    late = asyncio.ensure_future(held_store.save(token, point(offset=6400), 60))  # after it
    await asyncio.sleep(0)
    await held_store.aclose()  # the batch goes now, after the forget
    assert await late is False
    if isinstance(held_store, RedisResumeStore):
        assert await saving is False
    assert await held_store.claim(token, "acme", 60) is None


async def test_a_writer_forgotten_with_its_save_in_the_batch_leaves_nothing_to_resume(
        held_store: ResumeStore) -> None:
    """ResumeWriter.forget cancels the save it has in flight, but a batched store still sends
    it (server/billing/script_batch.py): the store refuses it after the forget."""
    token = uuid.uuid4().hex
    writer = ResumeWriter(held_store, token, epoch=0, ttl_s=60,
                          log=logging.getLogger("test"), log_extra={})
    outcomes: list[SaveOutcome] = []

    def on_saved(_: AnyResumePoint, outcome: SaveOutcome) -> None:
        outcomes.append(outcome)

    writer.on_saved = on_saved
    writer.request(lambda: point(offset=3200))
    for _ in range(3):  # the write begins a turn later, then the store takes the save
        await asyncio.sleep(0)
    await writer.forget()
    await held_store.aclose()
    assert await held_store.claim(token, "acme", 60) is None
    if isinstance(held_store, MemoryResumeStore):
        assert outcomes == ["saved"]  # stored as it was made, then forgotten
    else:
        assert outcomes == []  # cancelled while it waited in the batch


async def test_a_point_expires_after_its_window(store: ResumeStore) -> None:
    token = uuid.uuid4().hex
    assert await store.save(token, point(), 0.05)
    await asyncio.sleep(0.15)
    assert await store.claim(token, "acme", 60) is None


def test_the_redis_key_keeps_the_token_out_and_one_slot_per_session() -> None:
    token = "secret-token"
    key = resume_key(token)
    assert token not in key
    assert key.startswith("sg:resume:{") and key.endswith("}")


def test_memory_store_is_bounded() -> None:
    async def scenario() -> None:
        store = MemoryResumeStore(max_entries=3)
        for n in range(5):
            await store.save(f"t{n}", point(), 60)
        assert await store.claim("t0", "acme", 60) is None  # the oldest went first
        assert await store.claim("t4", "acme", 60) is not None

    asyncio.run(scenario())


async def test_saves_made_together_go_in_one_round_trip_each_with_its_own_answer(
        redis_url: str) -> None:
    """Sessions that save at the same moment (a burst of TTS requests, their first audio) share
    one pipeline; a superseded writer among them is still refused, the others saved."""
    client = connect(redis_url)
    try:
        store = RedisResumeStore(client)
        tokens = [uuid.uuid4().hex for _ in range(20)]
        for token in tokens:
            assert await store.save(token, point(offset=0), 60)
        assert await store.claim(tokens[0], "acme", 60) is not None  # epoch 1 now
        before = store._batch.batches
        saved = await asyncio.gather(*(store.save(t, point(offset=3200), 60) for t in tokens))
        assert saved == [False] + [True] * 19
        assert store._batch.batches - before == 1
        claimed = await store.claim(tokens[7], "acme", 60)
        assert isinstance(claimed, ResumePoint) and claimed.offset == 3200  # the batch wrote it
    finally:
        await client.aclose()


async def test_aclose_stores_the_saves_still_waiting_before_the_client_closes(
        redis_url: str) -> None:
    """The server closes the store after its sessions ended and before Redis: a save still
    waiting for its batch window is sent then, not lost with a task left behind."""
    client = connect(redis_url)
    try:
        store = RedisResumeStore(client, save_window_s=60.0)  # the window never ends by itself
        token = uuid.uuid4().hex
        saving = asyncio.ensure_future(store.save(token, point(offset=3200), 60))
        await asyncio.sleep(0)
        assert not saving.done()
        await store.aclose()
        assert saving.done() and saving.result() is True
        claimed = await store.claim(token, "acme", 60)
        assert isinstance(claimed, ResumePoint) and claimed.offset == 3200
    finally:
        await client.aclose()
