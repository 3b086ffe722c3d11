"""Who answers the caller: a turn (final transcript or keypad digits) in, reply text out.

A reply is an async iterator of text pieces, so speech starts on the first clause of a streamed
reply (an LLM's tokens, a chunked webhook body) instead of after the whole answer. Agents raise
``AgentError`` (or time out, which is the same); the session logs it and the call goes on: the
caller hears nothing for that turn rather than being hung up on.

    agent = build_agent(config.telephony.agent)
    async for piece in agent.respond(AgentTurn(call_id="CA1", stream_id="MZ1", text="hi")):
        ...
    await agent.aclose()
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp

from server.config import TelephonyAgentConfig
from server.telemetry import tracing

__all__ = [
    "Agent",
    "AgentError",
    "AgentTurn",
    "ChatAgent",
    "EchoAgent",
    "HistoryEntry",
    "WebhookAgent",
    "build_agent",
]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    role: Literal["caller", "agent"]
    text: str
    # An agent reply cut short by the caller (barge-in): `text` is the part that was played,
    # estimated from the acknowledged audio (marks), not what was sent or synthesized.
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "text": self.text, "interrupted": self.interrupted}


@dataclass(frozen=True, slots=True)
class AgentTurn:
    call_id: str
    stream_id: str
    text: str | None = None  # the caller's final transcript
    dtmf: str | None = None  # keypad digits, e.g. "12#"
    history: tuple[HistoryEntry, ...] = ()  # the conversation before this turn, oldest first


class AgentError(Exception):
    """The agent could not answer this turn (HTTP error, bad reply, timeout)."""


class Agent(Protocol):
    def respond(self, turn: AgentTurn) -> AsyncIterator[str]:
        """The reply as it is produced; the consumer may stop early (barge-in), which must
        release what the reply holds (connection, stream)."""
        ...

    async def aclose(self) -> None: ...


class EchoAgent:
    """The embedded default: needs nothing, proves the whole loop (ASR -> agent -> TTS)."""

    async def respond(self, turn: AgentTurn) -> AsyncIterator[str]:
        if turn.dtmf:
            yield f"You pressed {turn.dtmf}"
        elif turn.text:
            yield f"You said: {turn.text}"

    async def aclose(self) -> None:
        return None


class _HttpAgent:
    """Shared HTTP plumbing: one client session per agent, bearer token, and timeouts."""

    def __init__(self, cfg: TelephonyAgentConfig) -> None:
        self.cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        token = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: the session must belong to the running loop.
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(
                total=self.cfg.total_timeout_s,
                sock_connect=self.cfg.connect_timeout_s,
                sock_read=self.cfg.read_timeout_s,
            )
            self._session = aiohttp.ClientSession(timeout=timeout, headers=self._headers)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def respond(self, turn: AgentTurn) -> AsyncIterator[str]:
        return _timed(self._stream(turn), self.cfg)

    def _stream(self, turn: AgentTurn) -> AsyncGenerator[str, None]:
        raise NotImplementedError


async def _timed(pieces: AsyncGenerator[str, None], cfg: TelephonyAgentConfig
                 ) -> AsyncIterator[str]:
    """Time limits per step (first piece, gap between pieces, whole reply), so a stuck agent
    ends its turn instead of holding the call silent; HTTP errors become AgentError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.total_timeout_s
    limit = cfg.first_text_timeout_s
    try:
        while True:
            try:
                async with asyncio.timeout(max(0.0, min(limit, deadline - loop.time()))):
                    piece = await anext(pieces)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise AgentError("agent timed out") from None
            except (aiohttp.ClientError, ValueError) as exc:
                raise AgentError(f"agent request failed: {exc!r}"[:300]) from exc
            limit = cfg.read_timeout_s
            if piece:
                yield piece
    finally:
        await pieces.aclose()


class WebhookAgent(_HttpAgent):
    """POST {call_id, stream_id, text, dtmf, history} to `url`; the response body is spoken.

    `application/json` bodies are read whole and their `text` spoken; any other body is text
    (`text/plain`, usually chunked) and is spoken as it arrives.
    """

    async def _stream(self, turn: AgentTurn) -> AsyncGenerator[str, None]:
        body = {
            "call_id": turn.call_id,
            "stream_id": turn.stream_id,
            "text": turn.text,
            "dtmf": turn.dtmf,
            "history": [h.to_json() for h in turn.history],
        }
        headers: dict[str, str] = {}
        with tracing.ClientCall("upstream.agent", self.cfg.url, headers,
                                {"streamgate.agent": "webhook"}) as call:
            async with self._client().post(self.cfg.url, json=body, headers=headers) as resp:
                call.status = resp.status
                if resp.status >= 300:
                    detail = (await resp.text(errors="replace"))[:200]
                    raise AgentError(f"webhook answered HTTP {resp.status}: {detail}")
                if resp.content_type == "application/json":
                    data = await resp.json(content_type=None)
                    text = data.get("text") if isinstance(data, dict) else None
                    if not isinstance(text, str):
                        raise AgentError('webhook JSON reply has no "text" string')
                    yield text
                    return
                decoder = codecs.getincrementaldecoder(resp.charset or "utf-8")(errors="replace")
                async for data in resp.content.iter_any():
                    yield decoder.decode(data)
                yield decoder.decode(b"", final=True)


class ChatAgent(_HttpAgent):
    """An OpenAI-compatible `/v1/chat/completions` with `stream: true`: tokens go to speech
    as they arrive (server-sent events); a non-streamed JSON answer is accepted too."""

    def __init__(self, cfg: TelephonyAgentConfig) -> None:
        super().__init__(cfg)
        base = cfg.url.rstrip("/")
        if base.endswith("/chat/completions"):
            self.endpoint = base
        elif base.endswith("/v1"):
            self.endpoint = base + "/chat/completions"
        else:
            self.endpoint = base + "/v1/chat/completions"

    def messages(self, turn: AgentTurn) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.cfg.system_prompt}]
        for h in turn.history:
            if h.role == "caller":
                out.append({"role": "user", "content": h.text})
            else:
                # Tell the model the caller only heard this much of its previous answer.
                text = h.text + (" [interrupted by the caller]" if h.interrupted else "")
                out.append({"role": "assistant", "content": text})
        if turn.dtmf:
            out.append({"role": "user", "content": f"(The caller pressed keys: {turn.dtmf})"})
        else:
            out.append({"role": "user", "content": turn.text or ""})
        return out

    async def _stream(self, turn: AgentTurn) -> AsyncGenerator[str, None]:
        payload = {
            "model": self.cfg.model,
            "messages": self.messages(turn),
            "stream": True,
            "max_tokens": self.cfg.max_tokens,
            "temperature": self.cfg.temperature,
        }
        headers: dict[str, str] = {}
        with tracing.ClientCall("upstream.agent", self.endpoint, headers,
                                {"streamgate.agent": "chat"}) as call:
            async with self._client().post(self.endpoint, json=payload, headers=headers) as resp:
                call.status = resp.status
                if resp.status >= 300:
                    detail = (await resp.text(errors="replace"))[:200]
                    raise AgentError(f"chat completions answered HTTP {resp.status}: {detail}")
                if resp.content_type == "application/json":
                    data = await resp.json(content_type=None)
                    yield _message_content(data)
                    return
                async for raw in resp.content:  # one SSE line at a time
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments (": keep-alive"), event names
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    yield _delta_content(json.loads(data))


def _delta_content(chunk: Any) -> str:
    try:
        content = chunk["choices"][0].get("delta", {}).get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        if isinstance(chunk, dict) and "error" in chunk:
            raise AgentError(f"chat completions stream error: {chunk['error']!r}"[:300]) from None
        return ""  # e.g. a usage-only chunk with no choices
    return content if isinstance(content, str) else ""


def _message_content(data: Any) -> str:
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise AgentError("chat completions reply has no choices[0].message.content") from exc
    return content if isinstance(content, str) else ""


def build_agent(cfg: TelephonyAgentConfig) -> Agent:
    if cfg.kind == "webhook":
        return WebhookAgent(cfg)
    if cfg.kind == "chat":
        return ChatAgent(cfg)
    return EchoAgent()
