"""The resume store on Redis: every node sees every session's resume point.

One hash per session, `sg:resume:{<digest of the token>}` (the hash tag keeps its one key in one
slot of a Redis Cluster; the digest keeps tokens out of Redis): `epoch`, `tenant`, `point`
(msgspec JSON). Each operation is one Lua script, so a save under an older epoch can never
overwrite a resume's claim.

A forgotten session leaves a tombstone for the resume window: its `epoch` raised by one, no
`tenant` and no `point`. A save of the finished session still on its way (waiting in the batch
below while FORGET went straight out) then finds a newer epoch and is refused instead of
writing the point back; a claim finds no tenant (docs/decisions/15F1-resume-forget-tombstone.md).

Saves are many (a TTS session's text and charged chunks, an ASR session's quiet points and
reports, every session's) and wait for nothing: the saves of all sessions made within
`SAVE_WINDOW_S` of each other go to Redis as one pipeline (server/billing/script_batch.py,
docs/decisions/15T1-tts-first-audio.md), each still its own script with its own answer. One
EVALSHA alone costs ~70 us of gateway CPU in redis-py; in a batch of 20, about a third.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec

from server.billing.script_batch import ScriptBatcher
from server.billing.wallet_cache import LuaScript
from server.sessions.resume import AnyResumePoint

# A save waits at most this long for company: sessions that started together (a burst of
# requests, a batch of first audio) save within a few milliseconds of each other.
SAVE_WINDOW_S: Final = 0.005

_SAVE = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch and tonumber(epoch) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'tenant', ARGV[2], 'point', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

_CLAIM = """
local tenant = redis.call('HGET', KEYS[1], 'tenant')
if not tenant or tenant ~= ARGV[1] then return false end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {epoch, redis.call('HGET', KEYS[1], 'point')}
"""

_FORGET = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch and tonumber(epoch) ~= tonumber(ARGV[1]) then return 0 end
redis.call('HDEL', KEYS[1], 'tenant', 'point')
redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_decoder: msgspec.json.Decoder[AnyResumePoint] = msgspec.json.Decoder(AnyResumePoint)
_encoder = msgspec.json.Encoder()


class _SaveScript(LuaScript):
    """The save script for ScriptBatcher (which runs a LuaScript by its SHA1, and loads it on
    NOSCRIPT): its text is here, not in the billing scripts' directory."""

    def __init__(self) -> None:  # not LuaScript's: that one reads a file in lua/
        self.name = "resume_save"
        self.text = _SAVE
        self.sha = hashlib.sha1(_SAVE.encode(), usedforsecurity=False).hexdigest()


def resume_key(token: str) -> str:
    digest = hashlib.sha256(token.encode()).hexdigest()[:32]
    return f"sg:resume:{{{digest}}}"


class RedisResumeStore:
    def __init__(self, redis: Any, *, save_window_s: float = SAVE_WINDOW_S) -> None:
        # redis.asyncio.Redis or RedisCluster: both register scripts the same way.
        self._save = _SaveScript()
        self._batch = ScriptBatcher(redis, window_s=save_window_s)
        self._claim = redis.register_script(_CLAIM)
        self._forget = redis.register_script(_FORGET)

    async def save(self, token: str, point: AnyResumePoint, ttl_s: float) -> bool:
        saved = await self._batch(self._save, [resume_key(token)], [
            point.epoch, point.tenant_id, _encoder.encode(point).decode(),
            max(1, int(ttl_s * 1000))])
        return bool(saved)

    async def claim(self, token: str, tenant_id: str, ttl_s: float) -> AnyResumePoint | None:
        answer = await self._claim(keys=[resume_key(token)],
                                   args=[tenant_id, max(1, int(ttl_s * 1000))])
        if not answer:
            return None
        epoch, raw = answer
        point = _decoder.decode(raw)
        return msgspec.structs.replace(point, epoch=int(epoch))

    async def forget(self, token: str, epoch: int, ttl_s: float) -> None:
        await self._forget(keys=[resume_key(token)], args=[epoch, max(1, int(ttl_s * 1000))])

    async def aclose(self) -> None:
        await self._batch.aclose()
