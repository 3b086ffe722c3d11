"""Moved to server/idempotency (speech and vision use it too); kept for old imports."""

from __future__ import annotations

from server.idempotency import Claim, IdempotencyCache, IdempotencyConflict
from server.idempotency.memory import Stored

__all__ = ["Claim", "IdempotencyCache", "IdempotencyConflict", "Stored"]
