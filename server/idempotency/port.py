"""The port both reply stores implement, what a claim holds and how a claim is refused.

A route that honours `Idempotency-Key` does:

    async with store.claim((tenant, path, key), fingerprint) as claim:
        if claim.replay is not None:
            return the replay            # ran before: nothing runs, nothing is charged
        answer = run()
        claim.store(status, body)        # only what should be replayed; a failure is not
        return answer

and turns `IdempotencyRefused` into its JSON error (status, code, message, headers).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

CacheKey = tuple[str, str, str]  # tenant, route, Idempotency-Key


@dataclass(frozen=True, slots=True)
class Replay:
    status: int
    body: bytes


class Claim:
    """Held by the request that runs; `store` what it answered to make it replayable."""

    __slots__ = ("fingerprint", "replay", "result")

    def __init__(self, fingerprint: str, replay: Replay | None = None) -> None:
        self.fingerprint = fingerprint
        self.replay = replay  # set: answer with this, do nothing else
        self.result: tuple[int, bytes] | None = None

    def store(self, status: int, body: bytes) -> None:
        self.result = (status, body)


class IdempotencyRefused(Exception):
    """A claim that can neither run nor replay; the route answers with this JSON error."""

    status = 409
    code = "idempotency_conflict"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class IdempotencyConflict(IdempotencyRefused):
    """The key was used with a different request."""

    def __init__(self, message: str = "this Idempotency-Key was used with a different request"
                 ) -> None:
        super().__init__(message)


class IdempotencyInProgress(IdempotencyRefused):
    """The request that holds the key still ran when the duplicate stopped waiting for it."""

    code = "idempotency_in_progress"

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"a request with this Idempotency-Key is still running after "
                         f"{waited_s:g} s; retry later to get its answer", {"Retry-After": "1"})


class AnswerNotKept(IdempotencyRefused):
    """The key's request ran (and was charged) but its answer was too large to keep."""

    code = "idempotency_answer_not_kept"

    def __init__(self, status: int, limit: int) -> None:
        super().__init__(f"the request with this Idempotency-Key already ran (status {status}); "
                         f"its answer was larger than {limit} bytes and was not kept for replay: "
                         "use a new key to run it again")


class IdempotencyUnavailable(IdempotencyRefused):
    """The shared store cannot be reached: running without it could charge a retry twice."""

    status = 503
    code = "idempotency_unavailable"

    def __init__(self) -> None:
        super().__init__("Idempotency-Key replays are unavailable right now; retry shortly",
                         {"Retry-After": "2"})


class IdempotencyStore(Protocol):
    """Where answers live: one process (IdempotencyCache) or every node (RedisIdempotency)."""

    def claim(self, key: CacheKey, fingerprint: str) -> AbstractAsyncContextManager[Claim]:
        """Yield a Claim to run under (`replay` None) or to replay (`replay` set). Raises
        IdempotencyConflict for a different fingerprint, IdempotencyInProgress when the running
        request outlasts the wait, AnswerNotKept, IdempotencyUnavailable."""
        ...


class ReplyStores(Protocol):
    """Makes the store of one group of routes (each group has its own TTL and size)."""

    def __call__(self, *, ttl_s: float, max_entries: int) -> IdempotencyStore: ...
