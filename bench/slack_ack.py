"""How fast the Slack adapter acks slash commands, and how many Web API calls one answer costs.

Everything is local: the real bolt app over HTTP on 127.0.0.1, the fake Slack API from tests/slack_api.py and
the OpenAI-compatible test server from tests/openai_server.py (its reply delayed to stand in for a model).
Ack latency is printed beside the same server's GET /healthz under the same load, measured in the same
process, so the ratio says what the bolt stack and our listeners add to a bare aiohttp round trip.

    .venv/bin/python bench/slack_ack.py [--commands 200] [--concurrency 20] [--model-delay 0.5]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from openai_server import OpenAIServer, Reply  # noqa: E402
from slack_api import BOT_TOKEN, BOT_USER, SIGNING_SECRET, FakeSlackApi, SlackApp  # noqa: E402

from bot.config import Settings  # noqa: E402
from bot.engine import Engine  # noqa: E402
from bot.platforms.slack_http import create_slack_app, create_web_app  # noqa: E402

ANSWER_WORDS = 120  # a paragraph-sized answer, streamed word by word


async def timed_all(n: int, concurrency: int, send) -> list[float]:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> float:
        async with gate:
            start = time.perf_counter()
            await send(i)
            return time.perf_counter() - start

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def p50_p99(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), statistics.quantiles(samples, n=100)[98]


async def web_api_calls_per_answer(slack: SlackApp, api: FakeSlackApi, *, streaming: bool, messages: int,
                                   concurrency: int, tag: int) -> float:
    api.streaming = streaming
    before = len([c for c in api.calls if not c.method.startswith("respond/")])
    done = "chat.stopStream" if streaming else "chat.postMessage"

    async def mention(i: int) -> None:
        ts = f"17{tag:02d}{i:06d}.000100"
        await slack.event({"type": "app_mention", "user": "U1", "text": f"<@{BOT_USER}> tell me #{i}",
                           "ts": ts, "channel": f"C{tag}x{i}", "event_ts": ts})

    finished_before = len(api.calls_to(done))
    await timed_all(messages, concurrency, mention)
    if streaming:
        await api.wait_for(lambda: len(api.calls_to(done)) - finished_before >= messages, timeout=300)
    else:  # the last edit of each answer carries the model's final word
        await api.wait_for(lambda: sum("word119" in c.params.get("text", "")
                                       for c in api.calls_to("chat.update", "chat.postMessage")) >= messages,
                           timeout=300)
        await asyncio.sleep(0.2)
    after = len([c for c in api.calls if not c.method.startswith("respond/")])
    return (after - before) / messages


async def main(commands: int, concurrency: int, model_delay: float, messages: int) -> None:
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        personas = Path(tmp, "personas")
        personas.mkdir()
        (personas / "assistant.yaml").write_text("name: assistant\nsystem: You are a helpful assistant.\n")
        answer = " ".join(f"word{n}" for n in range(ANSWER_WORDS))
        async with OpenAIServer() as model:
            model.reply_with(lambda _: Reply(text=answer, delay=model_delay, chunk_delay=0.02))
            api = await FakeSlackApi().start()
            settings = Settings(
                _env_file=None, PERSONABOT_DATA_DIR=Path(tmp, "data"), PERSONABOT_PERSONAS_DIR=personas,
                PERSONABOT_BACKEND="openai", OPENAI_BASE_URL=model.base_url, OPENAI_API_KEY="sk-bench",
                SLACK_BOT_TOKEN=BOT_TOKEN, SLACK_SIGNING_SECRET=SIGNING_SECRET, SLACK_API_URL=api.api_url,
            )
            engine = await Engine.create(settings, knowledge=False)
            runner = web.AppRunner(create_web_app(create_slack_app(engine, settings)), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            connector = aiohttp.TCPConnector(limit=concurrency)
            async with aiohttp.ClientSession(connector=connector) as session:
                slack = SlackApp(f"{url}/slack/events", session)

                async def healthz(_: int) -> None:
                    async with session.get(f"{url}/healthz") as response:
                        await response.read()

                async def ask(i: int) -> None:
                    response = await slack.command("/ask", f"question {i}", channel=f"C{i % 10}",
                                                   response_url=api.response_url(f"ask{i}"))
                    assert response.status == 200, response.status

                await timed_all(concurrency, concurrency, healthz)  # warm up connections
                base = await timed_all(commands, concurrency, healthz)
                acks = await timed_all(commands, concurrency, ask)
                await api.wait_for(lambda: len(api.calls_to(*(f"respond/ask{i}" for i in range(commands))))
                                   >= commands, timeout=600)

                b50, b99 = p50_p99(base)
                a50, a99 = p50_p99(acks)
                print(f"slash-command ack, {commands} commands {concurrency} at a time, model delay {model_delay}s")
                print(f"  GET /healthz baseline  p50 {b50 * 1000:7.1f} ms  p99 {b99 * 1000:7.1f} ms")
                print(f"  /ask ack               p50 {a50 * 1000:7.1f} ms  p99 {a99 * 1000:7.1f} ms"
                      f"  (x{a50 / b50:.1f} / x{a99 / b99:.1f} the baseline; Slack allows 3000 ms)")
                print(f"  answered: {commands}/{commands} through response_url")

                for tag, streaming in ((1, True), (2, False)):
                    per = await web_api_calls_per_answer(slack, api, streaming=streaming, messages=messages,
                                                         concurrency=concurrency, tag=tag)
                    how = "chat streaming" if streaming else "chat.postMessage + chat.update"
                    print(f"Web API calls per answered mention ({how}, {ANSWER_WORDS}-word answer over "
                          f"~{ANSWER_WORDS * 0.02:.1f}s): {per:.2f}")
            await runner.cleanup()
            await engine.close()
            await api.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--model-delay", type=float, default=0.5)
    parser.add_argument("--messages", type=int, default=40)
    args = parser.parse_args()
    asyncio.run(main(args.commands, args.concurrency, args.model_delay, args.messages))
