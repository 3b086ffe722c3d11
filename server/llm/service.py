"""Chat completions and translation as the gateway serves them: check the model, reserve the
estimate, route, normalise the answer, settle the usage. Framework-free: errors are RouteError,
answers are dicts or SSE event bytes; server/http/llm.py puts them on the wire.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec

from server.billing.auth import Principal
from server.billing.service import RequestCharge
from server.config import LlmConfig
from server.llm.metering import (
    Estimate,
    RequestMeter,
    estimate_chat,
    estimate_prompt,
    reserve,
    settle,
    tokens_for_chars,
)
from server.llm.provider import AttemptFailed
from server.llm.router import LlmRouter, RouteError, UpstreamStream
from server.llm.schema import (
    ChatCompletionRequest,
    ChatMessage,
    TranslateRequest,
    UpstreamCompletion,
    UpstreamUsage,
)
from server.telemetry.metrics import Metrics

TRANSLATE_PROMPT = (
    "You are a translation engine. Translate the user's message {source}into {target}. "
    "Reply with the translation only: no notes, no quotes, no explanations."
)


def _usage(usage: UpstreamUsage | None, prompt_estimate: int, text: str,
           cfg: LlmConfig) -> dict[str, int]:
    """The upstream's usage; estimated from the text when it reported none."""
    if usage is not None:
        return {"prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens, "total_tokens": usage.total}
    completion = tokens_for_chars(len(text), cfg.chars_per_token)
    return {"prompt_tokens": prompt_estimate, "completion_tokens": completion,
            "total_tokens": prompt_estimate + completion}


class LlmService:
    def __init__(self, cfg: LlmConfig, *, requests: RequestMeter,
                 metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.requests = requests
        self.metrics = metrics
        self.router = LlmRouter(cfg, metrics)

    async def start(self) -> None:
        await self.router.start()

    async def aclose(self) -> None:
        await self.router.aclose()

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.cfg.request_deadline_s

    def count_tokens(self, model: str, tokens: int, answered: UpstreamUsage | None = None,
                     seconds: float = 0.0) -> None:
        """Settled tokens; with the upstream's own usage of an answered request, its cached
        prompt tokens and its output rate (completion tokens over the whole request)."""
        metrics = self.metrics
        if metrics is None:
            return
        if tokens > 0:
            metrics.llm_tokens.labels(model).inc(tokens)
        if answered is not None:
            if answered.cached_tokens:
                metrics.llm_cached_tokens.labels(model).inc(answered.cached_tokens)
            if answered.completion_tokens and seconds > 0:
                metrics.llm_tokens_per_second.labels(model).observe(
                    answered.completion_tokens / seconds)

    def chat_payload(self, req: ChatCompletionRequest, data: dict[str, Any],
                     est: Estimate) -> dict[str, Any]:
        """What the upstream gets: the client's body as sent (fields we do not model pass
        through), with the completion bounded so usage cannot outgrow the reservation."""
        payload = dict(data)
        if req.max_completion_tokens is None:
            payload["max_tokens"] = est.max_tokens
        payload["stream"] = req.stream
        if req.stream:
            # Usage is what the stream is settled to; the client sees the usage chunk only
            # if it asked for it.
            options = data.get("stream_options")
            payload["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                         "include_usage": True}
        else:
            payload.pop("stream_options", None)
        return payload

    async def complete(self, who: Principal, req: ChatCompletionRequest,
                       data: dict[str, Any], request_id: str) -> dict[str, Any]:
        self.router.check_model(req.model)
        est = estimate_chat(req, self.cfg)
        payload = self.chat_payload(req, data, est)
        answer, _, usage = await self._metered(who, req.model, payload, est, request_id)
        out = dict(answer)
        if not isinstance(out.get("id"), str):
            out["id"] = f"chatcmpl-{request_id}"
        if not isinstance(out.get("created"), int) or isinstance(out.get("created"), bool):
            out["created"] = int(time.time())
        out.update(object="chat.completion", model=req.model, usage=usage)
        return out

    async def translate(self, who: Principal, req: TranslateRequest,
                        request_id: str) -> dict[str, Any]:
        model = req.model or self.router.default_model()
        self.router.check_model(model)
        source = f"from {req.source_language} " if req.source_language else ""
        system = TRANSLATE_PROMPT.format(source=source, target=req.target_language)
        messages = [ChatMessage(role="system", content=system),
                    ChatMessage(role="user", content=req.text)]
        prompt = estimate_prompt(messages, self.cfg)
        # A translation is about as long as its source; the margin covers scripts that
        # tokenise less densely than the source.
        max_tokens = min(self.cfg.max_tokens_limit,
                         2 * tokens_for_chars(len(req.text), self.cfg.chars_per_token) + 64)
        est = Estimate(prompt, max_tokens, prompt + max_tokens)
        payload = {"messages": msgspec.to_builtins(messages), "max_tokens": max_tokens,
                   "temperature": 0, "stream": False}
        _, parsed, usage = await self._metered(who, model, payload, est, request_id)
        translation = (parsed.choices[0].message.content or "").strip()
        return {"translation": translation, "model": model, "usage": usage}

    async def _metered(self, who: Principal, model: str, payload: dict[str, Any],
                       est: Estimate, request_id: str
                       ) -> tuple[dict[str, Any], UpstreamCompletion, dict[str, int]]:
        deadline = self.deadline()
        charge = await reserve(self.requests, principal=who, request_id=request_id,
                               model=model, tokens=est.reserve_tokens)
        used = 0  # a request that fails costs nothing
        answered: UpstreamUsage | None = None
        started = time.perf_counter()
        try:
            _, answer, parsed = await self.router.complete(model, payload, deadline)
            answered = parsed.usage
            usage = _usage(parsed.usage, est.prompt_tokens, parsed.text, self.cfg)
            used = usage["total_tokens"]
            return answer, parsed, usage
        finally:
            await settle(charge, used, est.reserve_tokens)
            self.count_tokens(model, min(used, est.reserve_tokens), answered,
                              time.perf_counter() - started)

    async def open_stream(self, who: Principal, req: ChatCompletionRequest,
                          data: dict[str, Any], request_id: str) -> ChatStream:
        """Reserved and connected to a provider that sent a first valid chunk; errors before
        that are RouteError (and nothing is charged)."""
        self.router.check_model(req.model)
        est = estimate_chat(req, self.cfg)
        payload = self.chat_payload(req, data, est)
        deadline = self.deadline()
        charge = await reserve(self.requests, principal=who, request_id=request_id,
                               model=req.model, tokens=est.reserve_tokens)
        started = time.perf_counter()
        try:
            upstream = await self.router.open_stream(req.model, payload, deadline)
        except BaseException:
            await settle(charge, 0, est.reserve_tokens)
            raise
        wants_usage = req.stream_options is not None and req.stream_options.include_usage
        return ChatStream(self, upstream, charge, est, req.model, wants_usage, started)


class ChatStream:
    """The client side of one streamed completion: `next_event()` gives SSE event bytes until
    None; `finish()` (always called) closes the upstream and settles.

    A stream the upstream breaks after it started cannot be retried or failed over (the client
    holds part of an answer that would start over). It ends with the usage it is charged, as
    a usage chunk if the client asked for usage, and as `usage` beside the `error` of the last
    event in any case (docs/protocol.md, docs/billing.md).
    """

    def __init__(self, service: LlmService, upstream: UpstreamStream, charge: RequestCharge,
                 est: Estimate, model: str, wants_usage: bool, started: float) -> None:
        self._service = service
        self._started = started  # perf_counter() when the request went upstream
        self._upstream = upstream
        self._charge = charge
        self._est = est
        self._model = model
        self._wants_usage = wants_usage
        self._chars = 0
        self._usage: UpstreamUsage | None = None
        self._ended = False
        self._chunk_id: dict[str, Any] = {}  # id and created of the upstream's chunks
        self.failed = False

    async def next_event(self) -> bytes | None:
        while not self._ended:
            try:
                item = await self._upstream.next()
            except AttemptFailed as exc:
                # The router records the failure (breaker, metrics, log) when finish() closes
                # the upstream; here the client learns the answer is cut short and its cost.
                self._ended = self.failed = True
                return self._broken_stream_events(exc)
            if item is None:
                self._ended = True
                return b"data: [DONE]\n\n"
            chunk, data = item.chunk, item.data
            self._chars += len(chunk.text)
            if chunk.usage is not None:
                self._usage = chunk.usage
            for field in ("id", "created"):
                if field in data:
                    self._chunk_id[field] = data[field]
            if not self._wants_usage:
                if not chunk.choices:
                    continue  # the usage chunk the gateway asked for, not the client
                data.pop("usage", None)
            data["model"] = self._model
            return b"data: " + msgspec.json.encode(data) + b"\n\n"
        return None

    def _broken_stream_events(self, exc: AttemptFailed) -> bytes:
        usage = self.usage()
        name = self._upstream.provider.name
        # OpenAI's streaming error shape: SDKs raise on an event with an `error` object (its
        # message is the exception's). `usage` beside it is for readers of the raw stream;
        # SDK users get it from the usage chunk before it, as with every stream.
        error = {"error": {
            "message": f"provider {name!r} failed mid-answer: {exc.cause}; the answer is "
                       "incomplete",
            "type": "server_error",
            "code": "upstream_timeout" if exc.timeout else "upstream_error",
            "param": None,
        }, "usage": usage}
        out = b""
        if self._wants_usage:
            chunk = {"id": self._chunk_id.get("id", ""), "object": "chat.completion.chunk",
                     "created": self._chunk_id.get("created", int(time.time())),
                     "model": self._model, "choices": [], "usage": usage}
            out = b"data: " + msgspec.json.encode(chunk) + b"\n\n"
        return out + b"data: " + msgspec.json.encode(error) + b"\n\n"

    def usage(self) -> dict[str, int]:
        """What this stream is charged, in the API's usage shape."""
        if self.failed:
            # Broken mid-answer: the completion tokens delivered, the prompt not charged (the
            # request failed, and a failed request costs nothing but what it delivered).
            completion = (self._usage.completion_tokens if self._usage is not None
                          else tokens_for_chars(self._chars, self._service.cfg.chars_per_token))
            # Never more than was reserved: settle() caps the charge there too, and the
            # usage the client sees must be the charge.
            completion = min(completion, self._est.reserve_tokens)
            return {"prompt_tokens": 0, "completion_tokens": completion,
                    "total_tokens": completion}
        if self._usage is not None:
            return {"prompt_tokens": self._usage.prompt_tokens,
                    "completion_tokens": self._usage.completion_tokens,
                    "total_tokens": self._usage.total}
        # No usage chunk (the upstream ignores stream_options, or the client left): what was
        # streamed, estimated like the prompt.
        completion = tokens_for_chars(self._chars, self._service.cfg.chars_per_token)
        return {"prompt_tokens": self._est.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self._est.prompt_tokens + completion}

    def used_tokens(self) -> int:
        return self.usage()["total_tokens"]

    async def finish(self) -> int:
        self._upstream.close()
        used = self.used_tokens()
        await settle(self._charge, used, self._est.reserve_tokens)
        # The upstream's own usage of a whole answer (not of one broken mid-answer).
        answered = None if self.failed else self._usage
        self._service.count_tokens(self._model, min(used, self._est.reserve_tokens), answered,
                                   time.perf_counter() - self._started)
        return used


def new_request_id() -> str:
    return uuid.uuid4().hex


__all__ = ["ChatStream", "LlmService", "RouteError", "new_request_id"]
