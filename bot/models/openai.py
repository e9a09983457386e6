"""The OpenAI backend: OpenAI itself or any OpenAI-compatible server (Ollama, vLLM, LM Studio, llama.cpp).

Replies stream with the official `openai.AsyncOpenAI` client. Its own retries cover connection errors, 429 and
5xx before the first byte. The timeout here measures silence, not length: the wait for the first chunk and
every gap between chunks are each bounded by `timeout`, so a long answer that streams steadily is never cut,
while a server that goes quiet is reported within `timeout` seconds. Every failure becomes a `ModelError`
whose text is safe to show in a chat: a plain reason, never the server's own words (a proxy may echo
credentials in them), which go to the log instead. A stream that ends before the model said why it stopped
(no `finish_reason`: the connection dropped, or the server stopped short of `[DONE]`) is a failure too, never
a whole answer.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import openai

from bot.models.base import (
    Chunk, ContextLengthError, GenParams, Message, ModelBusy, ModelError, ModelTimeout, Usage,
)
from bot.models.tokens import TokenCounter

log = logging.getLogger(__name__)

FALLBACK_CONTEXT_WINDOW = 8192  # small enough for any model a compatible server is likely to run

# Context windows of OpenAI's chat models, matched by longest prefix so dated snapshots
# (gpt-4o-2024-08-06, gpt-4.1-mini-2025-04-14) resolve to their family.
KNOWN_CONTEXT_WINDOWS = {
    "gpt-5": 400_000,
    "gpt-5-chat": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-4.5": 128_000,
    "gpt-4o": 128_000,
    "chatgpt-4o": 128_000,
    "gpt-4-turbo": 128_000,
    "gpt-4-1106": 128_000,
    "gpt-4-0125": 128_000,
    "gpt-4-32k": 32_768,
    "gpt-4": 8_192,
    "gpt-3.5-turbo": 16_385,
    "gpt-3.5-turbo-instruct": 4_096,
    "o1": 200_000,
    "o1-mini": 128_000,
    "o1-preview": 128_000,
    "o3": 200_000,
    "o4-mini": 200_000,
}

# Which of OpenAI's chat models take image parts, matched by longest prefix like the windows above. Others, and
# every model of a compatible server, read text only unless PERSONABOT_VISION_MODELS or a persona says otherwise.
KNOWN_VISION = {
    "gpt-5": True,
    "gpt-4.1": True,
    "gpt-4.5": True,
    "gpt-4o": True,
    "gpt-4o-audio": False,
    "gpt-4o-realtime": False,
    "chatgpt-4o": True,
    "gpt-4-turbo": True,
    "o1": True,
    "o1-mini": False,
    "o1-preview": False,
    "o3": True,
    "o3-mini": False,
    "o4-mini": True,
}

# Reasoning models refuse `temperature`/`top_p` and take `max_completion_tokens`, which also pays for their
# hidden reasoning: without headroom a persona's 400-token cap would often end in an empty, cut-off reply.
REASONING_MODEL = re.compile(r"^(o\d|gpt-5(?!-chat))")
REASONING_HEADROOM = 4096

BROKE_OFF = "The model server stopped sending before the reply was finished."

CONTEXT_LENGTH_HINTS = re.compile(
    r"context[_ ]length|maximum context|context window|too many tokens|prompt is too long|exceeds? the context",
    re.IGNORECASE,
)


def known_context_window(model: str) -> int | None:
    name = model.rsplit("/", 1)[-1].lower()  # "openai/gpt-4o" as some gateways name it
    matches = [prefix for prefix in KNOWN_CONTEXT_WINDOWS if name.startswith(prefix)]
    return KNOWN_CONTEXT_WINDOWS[max(matches, key=len)] if matches else None


def known_vision(model: str) -> bool:
    name = model.rsplit("/", 1)[-1].lower()
    matches = [prefix for prefix in KNOWN_VISION if name.startswith(prefix)]
    return KNOWN_VISION[max(matches, key=len)] if matches else False


class OpenAIChatModel:
    """A `ChatModel` served over the OpenAI chat-completions API.

    `context_window`, when given (a persona's `model.context_window`), wins; otherwise OpenAI's published window
    for a known model name; otherwise a conservative 8192. Token counts are exact with tiktoken's vocabulary
    and a deliberate over-estimate without it (see `bot.models.tokens`).
    """

    def __init__(self, model: str, api_key: str | None, base_url: str | None = None, timeout: float = 60.0,
                 context_window: int | None = None, max_retries: int = 2):
        self.name = model
        self.timeout = timeout
        self.context_window = context_window or known_context_window(model) or FALLBACK_CONTEXT_WINDOW
        try:
            # base_url None lets the client read OPENAI_BASE_URL itself, then default to api.openai.com.
            self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout,
                                              max_retries=max_retries)
        except openai.OpenAIError as exc:  # no key anywhere
            raise ModelError("No OpenAI API key is configured: set OPENAI_API_KEY.") from exc
        self._server = _describe(str(self._client.base_url))
        self._tokens = TokenCounter(model)

    def count_tokens(self, messages: list[Message]) -> int:
        return self._tokens.messages(messages)

    async def aclose(self) -> None:
        await self._client.close()

    def request(self, messages: list[Message], params: GenParams) -> dict[str, Any]:
        """The chat-completions arguments: only what is set, so strict compatible servers accept them."""
        args: dict[str, Any] = {
            "model": self.name, "messages": list(messages), "stream": True,
            "stream_options": {"include_usage": True},
        }
        if REASONING_MODEL.match(self.name):
            args["max_completion_tokens"] = params.max_tokens + REASONING_HEADROOM
        else:
            args["temperature"] = params.temperature
            args["max_tokens"] = params.max_tokens
            if params.top_p != 1.0:
                args["top_p"] = params.top_p
        if params.stop:
            args["stop"] = list(params.stop)
        return args

    async def stream(self, messages: list[Message], params: GenParams) -> AsyncIterator[Chunk]:
        started = time.monotonic()
        finish, usage, pieces = None, None, []
        response = None
        try:
            # The first chunk, client retries included, must come within `timeout` of the call.
            response = await self._within(self._client.chat.completions.create(**self.request(messages, params)),
                                          self.timeout)
            events = response.__aiter__()
            first = True
            while True:
                wait = self.timeout - (time.monotonic() - started) if first else self.timeout
                try:
                    event = await self._within(events.__anext__(), max(wait, 0.001))
                except StopAsyncIteration:
                    break
                first = False
                if event.usage is not None:
                    usage = Usage(event.usage.prompt_tokens or 0, event.usage.completion_tokens or 0)
                for choice in event.choices[:1]:
                    if choice.delta and choice.delta.content:
                        pieces.append(choice.delta.content)
                        yield Chunk(text=choice.delta.content)
                    if choice.finish_reason:
                        finish = choice.finish_reason
        except openai.APIError as exc:
            dropped = isinstance(exc, openai.APIConnectionError) and not isinstance(exc, openai.APITimeoutError)
            if dropped and pieces:  # the connection broke mid-reply: the server was reached
                log.warning("stream from %s for model %s broke off after %d chunks", self._server, self.name,
                            len(pieces))
                raise ModelError(BROKE_OFF) from None
            raise self._translate(exc) from None
        except ValueError as exc:  # a compatible server that streams something other than JSON chunks
            log.warning("unreadable stream from %s for model %s: %s", self._server, self.name, exc)
            raise ModelError(f"The model server at {self._server} sent a reply this bot could not read.") from None
        finally:
            if response is not None:
                await response.close()
        if finish is None:
            log.warning("stream from %s for model %s ended without a finish_reason after %d chunks", self._server,
                        self.name, len(pieces))
            raise ModelError(BROKE_OFF)
        if usage is None:  # servers that ignore stream_options
            usage = Usage(self.count_tokens(messages), self._tokens.text("".join(pieces)))
        yield Chunk(finish_reason=_finish_reason(finish), usage=usage)

    async def _within(self, awaitable, seconds: float):
        # asyncio.timeout, unlike wait_for, spawns no task per chunk; it only ever wraps our own await, never
        # a `yield`, so the consumer's time between chunks is not counted.
        try:
            async with asyncio.timeout(seconds):
                return await awaitable
        except TimeoutError:
            raise self._timed_out() from None

    def _timed_out(self) -> ModelTimeout:
        return ModelTimeout(f"The model did not answer within {self.timeout:g} s; try again in a moment.")

    def _translate(self, exc: openai.APIError) -> ModelError:
        status = getattr(exc, "status_code", None)
        message = _server_message(exc)
        log.warning("%s from %s for model %s: status=%s code=%s request_id=%s: %s", type(exc).__name__,
                    self._server, self.name, status, getattr(exc, "code", None), getattr(exc, "request_id", None),
                    message)
        if isinstance(exc, openai.APITimeoutError):
            return self._timed_out()
        if isinstance(exc, openai.APIConnectionError):
            return ModelError(f"Could not reach the model server at {self._server}.")
        if getattr(exc, "code", None) == "context_length_exceeded" or (
                status in (400, 413, 422) and CONTEXT_LENGTH_HINTS.search(message)):
            return ContextLengthError("The conversation is too long for the model's context window.")
        if isinstance(exc, openai.AuthenticationError):
            return ModelError("The model server refused the API key; check OPENAI_API_KEY.")
        if isinstance(exc, openai.PermissionDeniedError):
            return ModelError(f"This API key may not use the model {self.name}.")
        if isinstance(exc, openai.NotFoundError):
            return ModelError(f"The model server at {self._server} has no model named {self.name}.")
        if isinstance(exc, openai.RateLimitError):
            if getattr(exc, "code", None) == "insufficient_quota":
                return ModelError("The OpenAI account behind this bot has run out of quota.")
            return ModelBusy("The model is rate-limited right now; try again in a moment.")
        if status is not None and status >= 500:
            return ModelError(f"The model server had an error (HTTP {status}); try again in a moment.")
        if status is not None:
            return ModelError(f"The model server refused the request (HTTP {status}); the bot's log has the details.")
        return ModelError("The model server reported an error; the bot's log has the details.")


def _finish_reason(reason: str) -> str:
    if reason in ("stop", "length", "content_filter"):
        return reason
    return "stop"  # tool_calls / function_call never apply here


def _server_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return body["message"][:300]
    return (exc.message or type(exc).__name__)[:300]


def _describe(base_url: str) -> str:
    """The server's address without any credentials or path, for messages users see."""
    parts = urlsplit(base_url)
    return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else "the configured URL"
