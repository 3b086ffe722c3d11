"""Bounds on `Idempotency-Key` replays (server/idempotency): how long a duplicate waits for the
request that runs, how long a dead owner blocks its key, and how large a kept answer may be."""

from __future__ import annotations

from typing import Final

# A duplicate that arrives while the first request runs waits this long for its answer, then
# gets 409 `idempotency_in_progress` (Retry-After: 1). Longer than an LLM request's default
# deadline (llm.request_deadline_s = 60), shorter than a client's usual 2-minute timeout.
WAIT_S: Final = 90.0
# It polls the shared store at this interval, growing by half each time up to the cap: the
# first answers (a short LLM request) are seen within tens of ms, a long one costs a few
# Redis commands per second per waiter.
POLL_FIRST_S: Final = 0.02
POLL_MAX_S: Final = 0.5
# The running marker of a request lives this long and is refreshed every third of it while the
# request runs: the key of a process killed mid-request is free again after at most this.
OWNER_TTL_S: Final = 10.0
# Larger answers are not kept (a replay is refused with 409 `idempotency_answer_not_kept`
# rather than run and charged again): Redis holds every answer for its whole TTL.
MAX_ANSWER_BYTES: Final = 8 * 1024 * 1024
