"""The OpenAI backend through the official client, over real HTTP, against the local test server."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import subprocess
import sys

import openai
import pytest

from bot.models.base import ContextLengthError, GenParams, ModelBusy, ModelError, ModelTimeout
from bot.models.openai import FALLBACK_CONTEXT_WINDOW, OpenAIChatModel
from openai_server import OpenAIServer, Reply, openai_server, openai_server_thread  # noqa: F401  (fixtures)

HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there"}]


@pytest.fixture
async def model_for():
    """Builds models against a server and closes their connections after the test."""
    models: list[OpenAIChatModel] = []

    def build(server: OpenAIServer | None, name: str = "gpt-4o-mini", **kwargs) -> OpenAIChatModel:
        kwargs.setdefault("timeout", 2.0)
        kwargs.setdefault("base_url", server.base_url if server else None)
        models.append(OpenAIChatModel(name, api_key=kwargs.pop("api_key", "sk-test-secret"), **kwargs))
        return models[-1]

    yield build
    for model in models:
        await model.aclose()


async def collect(model: OpenAIChatModel, messages=HELLO, params: GenParams = GenParams()):
    return [chunk async for chunk in model.stream(messages, params)]


async def test_reply_streams_in_order_and_ends_with_finish_reason_and_usage(openai_server, model_for):
    openai_server.script(Reply(chunks=["Once", " upon", " a", " time"], usage={"prompt_tokens": 17,
                                                                                "completion_tokens": 4}))
    chunks = await collect(model_for(openai_server))
    assert [c.text for c in chunks[:-1]] == ["Once", " upon", " a", " time"]
    last = chunks[-1]
    assert (last.text, last.finish_reason, last.usage.prompt_tokens, last.usage.completion_tokens) == (
        "", "stop", 17, 4)
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_request_carries_model_messages_and_generation_settings(openai_server, model_for):
    await collect(model_for(openai_server, "gpt-4o"), params=GenParams(temperature=0.3, max_tokens=123,
                                                                       stop=("END",)))
    sent = openai_server.requests[-1]
    assert sent["model"] == "gpt-4o"
    assert sent["messages"] == HELLO
    assert (sent["temperature"], sent["max_tokens"], sent["stop"]) == (0.3, 123, ["END"])
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert "top_p" not in sent  # unset settings are not sent to strict compatible servers
    assert openai_server.headers[-1]["Authorization"] == "Bearer sk-test-secret"


async def test_reasoning_models_get_max_completion_tokens_and_no_temperature(openai_server, model_for):
    await collect(model_for(openai_server, "o3-mini"), params=GenParams(temperature=0.9, max_tokens=300))
    sent = openai_server.requests[-1]
    assert "temperature" not in sent and "max_tokens" not in sent
    assert sent["max_completion_tokens"] > 300


async def test_openai_base_url_from_environment_is_honoured(openai_server, monkeypatch, model_for):
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    model = model_for(None)
    chunks = await collect(model)
    assert "".join(c.text for c in chunks) == "echo: hello there"
    assert len(openai_server.requests) == 1


async def test_server_error_is_retried_then_reported_plainly(openai_server, model_for):
    openai_server.script(Reply.error(500), Reply.error(500), Reply.error(500))
    with pytest.raises(ModelError) as raised:
        await collect(model_for(openai_server, max_retries=2))
    assert len(openai_server.requests) == 3
    assert str(raised.value) == "The model server had an error (HTTP 500); try again in a moment."


async def test_server_error_then_success_answers_normally(openai_server, model_for):
    openai_server.script(Reply.error(502), "recovered")
    chunks = await collect(model_for(openai_server))
    assert "".join(c.text for c in chunks) == "recovered"
    assert len(openai_server.requests) == 2


async def test_rate_limit_is_retried_before_the_reply(openai_server, model_for):
    openai_server.script(Reply.rate_limited(), "after the wait")
    chunks = await collect(model_for(openai_server))
    assert "".join(c.text for c in chunks) == "after the wait"
    assert len(openai_server.requests) == 2


async def test_persistent_rate_limit_reports_the_model_busy(openai_server, model_for):
    openai_server.script(*[Reply.rate_limited()] * 2)
    with pytest.raises(ModelBusy, match="rate-limited"):
        await collect(model_for(openai_server, max_retries=1))


async def test_context_length_exceeded_raises_context_length_error(openai_server, model_for):
    openai_server.script(Reply.context_length_exceeded())
    with pytest.raises(ContextLengthError):
        await collect(model_for(openai_server))
    assert len(openai_server.requests) == 1  # a 400 is not retried


async def test_context_overflow_worded_by_a_compatible_server_is_recognised(openai_server, model_for):
    openai_server.script(Reply.error(400, "This model's maximum context length is 2048 tokens. However, you "
                                          "requested 2100 tokens.", type="BadRequestError"))
    with pytest.raises(ContextLengthError):
        await collect(model_for(openai_server))


async def test_rejected_api_key_is_reported_without_the_key(openai_server, model_for):
    openai_server.script(Reply.error(401, "Incorrect API key provided: sk-test-secret.",
                                     type="invalid_request_error", code="invalid_api_key"))
    with pytest.raises(ModelError) as raised:
        await collect(model_for(openai_server))
    assert "OPENAI_API_KEY" in str(raised.value) and "sk-test" not in str(raised.value)


async def test_refused_request_is_reported_plainly_and_its_words_only_logged(openai_server, model_for, caplog):
    openai_server.script(Reply.echoing_key("sk-proxy-FAKE0123456789"))
    with caplog.at_level(logging.WARNING, logger="bot.models.openai"), pytest.raises(ModelError) as raised:
        await collect(model_for(openai_server))
    assert str(raised.value) == "The model server refused the request (HTTP 400); the bot's log has the details."
    assert "sk-proxy-FAKE0123456789" in caplog.text


@pytest.mark.parametrize("cut", [Reply(text="it was the best of", drop_after=2),
                                 Reply(text="it was the best of", finish_reason=None)],
                         ids=["connection dropped", "no finish_reason"])
async def test_stream_that_ends_before_a_finish_reason_is_a_failure_not_an_answer(openai_server, model_for, cut):
    openai_server.script(cut)
    received = []
    with pytest.raises(ModelError, match="stopped sending before the reply was finished"):
        async for chunk in model_for(openai_server).stream(HELLO, GenParams()):
            received.append(chunk.text)
    assert received[:2] == ["it", " was"] and all(chunk for chunk in received)


async def test_unknown_model_names_the_model(openai_server, model_for):
    openai_server.script(Reply.error(404, "The model `gpt-9` does not exist", code="model_not_found"))
    with pytest.raises(ModelError, match="no model named gpt-9"):
        await collect(model_for(openai_server, "gpt-9"))


async def test_unreachable_server_is_reported_plainly(model_for):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = model_for(None, base_url=f"http://user:pw@127.0.0.1:{port}/v1", max_retries=0)
    with pytest.raises(ModelError) as raised:
        await collect(model)
    assert str(raised.value) == f"Could not reach the model server at 127.0.0.1:{port}."


async def test_unreadable_stream_is_reported_plainly(openai_server, model_for):
    openai_server.script(Reply(raw="data: {this is not json\n\n"))
    with pytest.raises(ModelError, match="could not read"):
        await collect(model_for(openai_server))


async def test_slow_but_steady_stream_longer_than_the_timeout_completes(openai_server, model_for):
    words = [f" w{n}" for n in range(8)]
    openai_server.script(Reply(chunks=words, chunk_delay=0.1))
    chunks = await collect(model_for(openai_server, timeout=0.4))
    assert "".join(c.text for c in chunks) == "".join(words)
    assert chunks[-1].finish_reason == "stop"


async def test_stream_that_stalls_raises_model_timeout(openai_server, model_for):
    openai_server.script(Reply(text="it begins and then", stall_after=2))
    received = []
    with pytest.raises(ModelTimeout, match="did not answer within 0.3 s"):
        async for chunk in model_for(openai_server, timeout=0.3).stream(HELLO, GenParams()):
            received.append(chunk.text)
    assert received == ["it", " begins"]


async def test_no_first_byte_within_timeout_raises_model_timeout(openai_server, model_for):
    openai_server.script(*[Reply(text="too late", delay=3)] * 3)
    with pytest.raises(ModelTimeout):
        await collect(model_for(openai_server, timeout=0.3))


@pytest.mark.parametrize("reason", ["length", "content_filter"])
async def test_finish_reason_is_passed_through(openai_server, reason, model_for):
    openai_server.script(Reply(text="partial answer", finish_reason=reason))
    chunks = await collect(model_for(openai_server))
    assert chunks[-1].finish_reason == reason


async def test_usage_is_estimated_when_the_server_sends_none(openai_server, model_for):
    openai_server.script(Reply(text="four words right here", send_usage=False))
    model = model_for(openai_server)
    usage = (await collect(model))[-1].usage
    assert usage.prompt_tokens == model.count_tokens(HELLO)
    assert usage.completion_tokens >= 4


def test_server_in_a_thread_serves_code_that_runs_its_own_loop(openai_server_thread):
    listed = openai.OpenAI(api_key="sk-test", base_url=openai_server_thread.base_url).models.list()
    assert "gpt-4o-mini" in [m.id for m in listed.data]

    async def ask() -> str:
        model = OpenAIChatModel("gpt-4o-mini", api_key="sk-test", base_url=openai_server_thread.base_url)
        try:
            return "".join([c.text async for c in model.stream(HELLO, GenParams())])
        finally:
            await model.aclose()

    assert asyncio.run(ask()) == "echo: hello there"


def test_context_window_comes_from_persona_then_known_models_then_fallback():
    assert OpenAIChatModel("gpt-4o-mini", api_key="k", context_window=4000).context_window == 4000
    assert OpenAIChatModel("gpt-4o-2024-08-06", api_key="k").context_window == 128_000
    assert OpenAIChatModel("gpt-4.1-mini", api_key="k").context_window == 1_047_576
    assert OpenAIChatModel("gpt-3.5-turbo", api_key="k").context_window == 16_385
    assert OpenAIChatModel("llama3.2:3b", api_key="k").context_window == FALLBACK_CONTEXT_WINDOW


def test_count_tokens_grows_with_the_conversation_and_covers_every_word():
    model = OpenAIChatModel("gpt-4o-mini", api_key="k")
    one = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
    two = one + [{"role": "assistant", "content": "and then the dog woke up"}]
    assert model.count_tokens(one) >= 9 + 4 + 3
    assert model.count_tokens(two) >= model.count_tokens(one) + 6 + 4


def test_count_tokens_offline_uses_the_stated_estimate(tmp_path):
    """A fresh process with an empty tiktoken cache and the network refused, as on an offline server."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env.update(TIKTOKEN_CACHE_DIR=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    messages = [{"role": "user", "content": "héllo wörld, ça va?"}, {"role": "assistant", "content": "très bien"}]
    script = ("import json, sys; from bot.models.openai import OpenAIChatModel; "
              "m = OpenAIChatModel('gpt-4o-mini', api_key='k'); msgs = json.loads(sys.argv[1]); "
              "print(json.dumps([m.count_tokens(msgs), m.count_tokens(msgs), m._tokens.exact]))")
    result = subprocess.run([sys.executable, "-c", script, json.dumps(messages)], env=env, capture_output=True,
                            text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    first, second, exact = json.loads(result.stdout)
    expected = sum(math.ceil(len(m["content"].encode()) / 3) + 4 for m in messages) + 3
    assert (first, second, exact) == (expected, expected, False)
    assert list(tmp_path.iterdir()) == []  # nothing was fetched or half-written
