"""Tokens: estimated and reserved before the upstream call, settled to the upstream's usage.

The reservation is prompt (estimated from characters, deliberately on the high side) plus the
completion tokens the request may produce (`max_tokens` x `n`, which is also what the upstream
is told, so it cannot produce more). The settlement never exceeds the reservation: that is the
price the tenant agreed to when the request was admitted.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Protocol

import msgspec

from server.billing.auth import Principal
from server.billing.meter import BillingUnavailable, InsufficientBalance, RateLimited
from server.billing.service import RequestCharge
from server.config import LlmConfig
from server.llm.router import RouteError
from server.llm.schema import ChatCompletionRequest, ChatMessage

log = logging.getLogger("streamgate.llm")
TOKENS = "tokens"
# Role markers and separators the chat template adds per message, in tokens.
PER_MESSAGE_TOKENS = 4


class RequestMeter(Protocol):
    """BillingService, or UnmeteredRequests when billing is off."""

    async def reserve_request(self, *, principal: Principal, request_id: str, model: str,
                              unit: str, estimate_units: int) -> RequestCharge: ...


@dataclass(frozen=True, slots=True)
class Estimate:
    prompt_tokens: int
    max_tokens: int  # per choice; sent upstream
    reserve_tokens: int


def tokens_for_chars(chars: int, chars_per_token: float) -> int:
    return math.ceil(chars / chars_per_token) if chars > 0 else 0


def message_chars(messages: list[ChatMessage]) -> int:
    chars = 0
    for m in messages:
        chars += len(m.role) + len(m.name or "")
        if isinstance(m.content, str):
            chars += len(m.content)
        elif m.content is not None:
            for part in m.content:
                text = part.get("text")
                # Non-text parts (images, audio) are counted by their encoded size: an upper
                # bound the settlement corrects downwards.
                chars += len(text) if isinstance(text, str) else len(msgspec.json.encode(part))
        if m.tool_calls:
            chars += len(msgspec.json.encode(m.tool_calls))
    return chars


def estimate_prompt(messages: list[ChatMessage], cfg: LlmConfig) -> int:
    return (tokens_for_chars(message_chars(messages), cfg.chars_per_token)
            + PER_MESSAGE_TOKENS * len(messages))


def estimate_chat(req: ChatCompletionRequest, cfg: LlmConfig) -> Estimate:
    for given in (req.max_tokens, req.max_completion_tokens):
        if given is not None and given > cfg.max_tokens_limit:
            raise RouteError(400, "bad_request",
                             f"max_tokens may be at most {cfg.max_tokens_limit} on this gateway")
    requested = req.max_completion_tokens or req.max_tokens
    max_tokens = requested or cfg.default_max_tokens
    prompt = estimate_prompt(req.messages, cfg)
    return Estimate(prompt, max_tokens, prompt + max_tokens * req.n)


def token_prices(cfg: LlmConfig) -> dict[tuple[str, str], tuple[int, int]]:
    """(public model, "tokens") -> (micros per 1000 tokens, 1000), for price plans."""
    return {(model, TOKENS): (price, 1000)
            for model, price in cfg.price_micros_per_1k_tokens.items()}


async def reserve(requests: RequestMeter, *, principal: Principal, request_id: str,
                  model: str, tokens: int) -> RequestCharge:
    try:
        return await requests.reserve_request(principal=principal, request_id=request_id,
                                              model=model, unit=TOKENS, estimate_units=tokens)
    except InsufficientBalance as exc:
        raise RouteError(402, "insufficient_balance", str(exc)) from None
    except RateLimited as exc:
        raise RouteError(429, "rate_limited", str(exc), retry_after=exc.retry_after_s) from None
    except BillingUnavailable as exc:
        raise RouteError(503, "billing_unavailable", str(exc), retry_after=2.0) from None


async def settle(charge: RequestCharge, used_tokens: int, reserved_tokens: int) -> int:
    """Charge min(used, reserved); shielded so a client hanging up mid-settle cannot leave the
    reservation to the lease sweeper. Billing errors are logged, never raised: the answer has
    been produced and the lease expiry settles what this could not."""
    units = max(0, min(used_tokens, reserved_tokens))
    try:
        return await asyncio.shield(charge.settle(units))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error("llm settlement failed: %s", exc, extra={"tokens": units})
        return 0
