"""Wire types of the LLM proxy, validated with msgspec; the OpenAPI schemas are made from them
(server/http/openapi.py: one definition, so the documented contract and the validation cannot
drift apart).

Client requests keep fields they do not name (temperature, tools, response_format, ...): they
are passed to the upstream as sent. Upstream answers are checked for the shape clients rely on;
anything else is garbage, which counts against the provider and fails over.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

NonNegative = Annotated[int, Meta(ge=0)]

# --- client requests -------------------------------------------------------------------------


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # A string, or content parts ({"type": "text", "text": ...}, {"type": "image_url", ...}).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct):
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=4096)]
    stream: bool = False
    stream_options: ChatStreamOptions | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    # Several choices multiply the completion tokens the reservation must cover.
    n: Annotated[int, Meta(ge=1, le=8)] = 1


class TranslateRequest(msgspec.Struct, forbid_unknown_fields=True):
    # Even escaped at 12 bytes a character (astral \uXXXX pairs), a text this long stays
    # under the default 1 MiB body limit: a valid body is never refused as too large.
    text: Annotated[str, Meta(min_length=1, max_length=50_000)]
    target_language: Annotated[str, Meta(min_length=1, max_length=64)]
    source_language: Annotated[str, Meta(max_length=64)] | None = None
    model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None


# --- responses to clients (documentation; the handlers build them as dicts) ------------------


class TokenUsage(msgspec.Struct):
    prompt_tokens: NonNegative
    completion_tokens: NonNegative
    total_tokens: NonNegative


class ChatChoiceMessage(msgspec.Struct):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(msgspec.Struct):
    message: ChatChoiceMessage
    index: int = 0
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: TokenUsage


class TranslateResponse(msgspec.Struct):
    translation: str
    model: str
    usage: TokenUsage


# --- upstream answers (validation only) ------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: NonNegative = 0  # prompt tokens the provider served from its prompt cache


class UpstreamUsage(msgspec.Struct):
    prompt_tokens: NonNegative = 0
    completion_tokens: NonNegative = 0
    total_tokens: NonNegative | None = None
    prompt_tokens_details: PromptTokensDetails | None = None

    @property
    def cached_tokens(self) -> int:
        details = self.prompt_tokens_details
        return details.cached_tokens if details is not None else 0

    @property
    def total(self) -> int:
        if self.total_tokens is not None:
            return self.total_tokens
        return self.prompt_tokens + self.completion_tokens


class UpstreamCompletion(msgspec.Struct):
    choices: Annotated[list[ChatChoice], Meta(min_length=1)]
    usage: UpstreamUsage | None = None

    @property
    def text(self) -> str:
        return "".join(c.message.content or "" for c in self.choices)


class ChunkDelta(msgspec.Struct):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    delta: ChunkDelta
    index: int = 0
    finish_reason: str | None = None


class UpstreamChunk(msgspec.Struct):
    choices: list[ChunkChoice]  # empty in the final usage-only chunk
    usage: UpstreamUsage | None = None

    @property
    def text(self) -> str:
        return "".join(c.delta.content or "" for c in self.choices)
