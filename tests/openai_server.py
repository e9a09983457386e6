"""A scriptable OpenAI-compatible server on 127.0.0.1, so tests drive the real `openai` client over real HTTP.

It serves `POST /v1/chat/completions` (streamed as SSE or not) and `GET /v1/models`, records every request body
in arrival order (retries included, so a test can count attempts), and answers from a queue of scripted
replies, falling back to a reply function (default: ``"echo: <last user message>"``).

Point the code under test at ``server.base_url`` (``http://127.0.0.1:PORT/v1``), e.g. with
``OPENAI_BASE_URL`` / ``Settings(OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-test")`` or
``OpenAIChatModel("gpt-4o-mini", api_key="sk-test", base_url=server.base_url)``.

In an async test (pytest-asyncio, ``asyncio_mode=auto``, function-scoped loops), import the fixture into the
test module (tests/ is on ``sys.path`` under pytest, like ``tiny_gpt2``)::

    from openai_server import Reply, openai_server  # noqa: F401  (fixture)

    async def test_reply_reaches_user(openai_server, settings):
        openai_server.script("Hello there!", Reply.error(500), Reply(text="cut", finish_reason="length"))
        openai_server.reply_with(lambda messages: f"you said {messages[-1]['content']}")
        ...
        assert openai_server.requests[-1]["messages"][-1]["content"] == "hi"

When the code under test runs its own event loop (a sync test, a framework with its own loop), run the server
on a background thread instead — the ``openai_server_thread`` fixture, or by hand::

    server = OpenAIServer.start_in_thread()
    try: ...use server.base_url...
    finally: server.stop()

Scripted replies (`Reply`), consumed one per chat-completion request, before the reply function:
- ``"text"`` or ``Reply(text=..., chunks=[...])`` — streamed as several SSE chunks (``chunks`` fixes the split);
  ``finish_reason`` may be ``"length"`` or ``"content_filter"``, or ``None`` to end the stream (``[DONE]``
  included) without ever saying why; ``usage`` overrides the counted usage and ``send_usage=False`` omits the
  usage chunk, like servers that ignore ``stream_options``.
- ``Reply.error(status, message, code=...)`` — an OpenAI-style error body; ``Reply.context_length_exceeded()``
  is the 400 OpenAI sends for an over-long prompt; ``Reply.echoing_key(key)`` is a proxy's 400 whose message
  repeats the credentials it was sent. Errors carry ``retry-after-ms: 1`` so client retries are quick.
- ``Reply(raw="data: {not json\\n\\n")`` — a stream body sent verbatim, for servers that misbehave.
- ``delay`` — seconds before the first byte; ``chunk_delay`` — seconds between chunks;
  ``stall_after=N`` — send N content chunks, then go silent (the connection stays open until the client gives up
  or the server stops); ``drop_after=N`` — send N content chunks, then drop the connection mid-body (no
  ``finish_reason``, no ``[DONE]``), as a crashed server or a proxy's idle cut does.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
from aiohttp import web

ReplyFn = Callable[[list[dict]], "str | Reply"]


@dataclass
class Reply:
    text: str = ""
    chunks: list[str] | None = None
    finish_reason: str | None = "stop"
    usage: dict | None = None
    status: int = 200
    error: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    chunk_delay: float = 0.0
    stall_after: int | None = None
    drop_after: int | None = None
    send_usage: bool = True  # False acts like a server that ignores stream_options.include_usage
    raw: str | None = None  # sent verbatim as the stream body, for malformed-server cases

    @classmethod
    def error(cls, status: int = 500, message: str = "The server had an error while processing your request.",
              *, type: str = "server_error", code: str | None = None, retry_after_ms: int = 1) -> "Reply":
        return cls(status=status, error={"message": message, "type": type, "param": None, "code": code},
                   headers={"retry-after-ms": str(retry_after_ms)})

    @classmethod
    def rate_limited(cls) -> "Reply":
        return cls.error(429, "Rate limit reached for requests.", type="requests", code="rate_limit_exceeded")

    @classmethod
    def context_length_exceeded(cls, limit: int = 8192, asked: int = 9000) -> "Reply":
        return cls.error(
            400,
            f"This model's maximum context length is {limit} tokens. However, your messages resulted in {asked} "
            "tokens. Please reduce the length of the messages.",
            type="invalid_request_error", code="context_length_exceeded",
        )

    @classmethod
    def echoing_key(cls, key: str = "sk-proxy-FAKE0123456789") -> "Reply":
        return cls.error(400, f"Upstream rejected the request sent with Authorization: Bearer {key}",
                         type="invalid_request_error")

    def pieces(self) -> list[str]:
        if self.chunks is not None:
            return list(self.chunks)
        return re.findall(r"\s*\S+", self.text) or [self.text]


def echo(messages: list[dict]) -> str:
    last_user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
    if isinstance(last_user, list):  # content parts
        last_user = " ".join(p.get("text", "") for p in last_user if isinstance(p, dict))
    return f"echo: {last_user}"


def rough_tokens(messages: list[dict]) -> int:
    return sum(len(str(m.get("content", "")).split()) + 4 for m in messages) + 3


class OpenAIServer:
    def __init__(self, models: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "test-model")):
        self.models = list(models)
        self.requests: list[dict[str, Any]] = []  # chat-completion request bodies, in arrival order
        self.headers: list[dict[str, str]] = []  # the matching request headers (e.g. Authorization)
        self.base_url = ""
        self._queue: deque[Reply] = deque()
        self._reply_fn: ReplyFn = echo
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- scripting -----------------------------------------------------------------------------------------
    def script(self, *replies: "str | Reply") -> "OpenAIServer":
        """Queue replies for the next requests, one each, in order; then the reply function answers."""
        self._queue.extend(Reply(text=r) if isinstance(r, str) else r for r in replies)
        return self

    def reply_with(self, fn: ReplyFn) -> "OpenAIServer":
        """Answer every unscripted request with fn(messages) -> str | Reply."""
        self._reply_fn = fn
        return self

    @property
    def last(self) -> dict[str, Any]:
        return self.requests[-1]

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> "OpenAIServer":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.set()  # releases stalled streams
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "OpenAIServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @classmethod
    def start_in_thread(cls, **kwargs: Any) -> "OpenAIServer":
        """Serve from a daemon thread with its own loop, for code under test that runs its own loop."""
        server = cls(**kwargs)
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            server._loop = loop
            try:
                loop.run_until_complete(server.start())
            except BaseException as exc:  # surfaced to the starting thread below
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(server.close())
            loop.close()

        server._thread = threading.Thread(target=run, name="openai-test-server", daemon=True)
        server._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return server

    def stop(self) -> None:
        """Stop a server started with `start_in_thread`."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    # --- handlers ------------------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "personabot-tests"} for m in self.models
        ]})

    def _next_reply(self, messages: list[dict]) -> Reply:
        if self._queue:
            return self._queue.popleft()
        reply = self._reply_fn(messages)
        return Reply(text=reply) if isinstance(reply, str) else reply

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": {"message": "Invalid JSON body.", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=400)
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        messages = body.get("messages") or []
        reply = self._next_reply(messages)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.status != 200:
            return web.json_response({"error": reply.error}, status=reply.status, headers=reply.headers)
        pieces = reply.pieces()
        usage = reply.usage or {"prompt_tokens": rough_tokens(messages), "completion_tokens": len(pieces)}
        usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        cid, created, model = f"chatcmpl-test{next(self._ids)}", int(time.time()), body.get("model", "")
        if not body.get("stream"):
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "finish_reason": reply.finish_reason, "logprobs": None}],
                "usage": usage,
            })
        return await self._stream(request, reply, pieces, usage, cid, created, model, body)

    async def _stream(self, request: web.Request, reply: Reply, pieces: list[str], usage: dict, cid: str,
                      created: int, model: str, body: dict) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(choices: list[dict], **extra: Any) -> None:
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": choices, **extra}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        try:
            if reply.raw is not None:
                await response.write(reply.raw.encode())
                await response.write_eof()
                return response
            await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            for n, piece in enumerate(pieces):
                if reply.stall_after is not None and n >= reply.stall_after:
                    await self._stall()
                    return response
                if reply.drop_after is not None and n >= reply.drop_after:
                    assert request.transport is not None
                    request.transport.close()  # mid-body: the chunked response never reaches its end
                    return response
                if n and reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
                await send([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
            if reply.stall_after is not None and reply.stall_after >= len(pieces):
                await self._stall()
                return response
            if reply.finish_reason is not None:
                await send([{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}])
            if reply.send_usage and (body.get("stream_options") or {}).get("include_usage"):
                await send([], usage=usage)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away (a timeout, a cancelled reply): nothing left to say
        return response

    async def _stall(self) -> None:
        assert self._closing is not None
        try:
            await asyncio.wait_for(self._closing.wait(), timeout=300)
        except asyncio.TimeoutError:
            pass


@pytest.fixture
async def openai_server():
    """An `OpenAIServer` on the test's event loop; see the module docstring."""
    async with OpenAIServer() as server:
        yield server


@pytest.fixture
def openai_server_thread():
    """An `OpenAIServer` on its own thread and loop, for code under test that runs its own loop."""
    server = OpenAIServer.start_in_thread()
    try:
        yield server
    finally:
        server.stop()
