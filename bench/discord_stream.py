"""How a streamed reply looks from Discord's side: edits per reply, time between edits, time to first text.

Runs the real bot (dpytest's fake Discord) and the real engine, SQLite history and OpenAI client against the
local OpenAI-compatible test server, and timestamps every REST send and edit the bot makes.

1. A 600-token reply streamed at 50 tokens/s (a typical hosted model): how many edits, how far apart, and the
   most requests in any 5 s window of the channel (Discord allows about 5).
2. An instant model: time from the user's message to the first visible text, against a baseline of the
   engine alone yielding its first piece in the same process (the ratio is the adapter's overhead).

    .venv/bin/python bench/discord_stream.py
"""
from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import discord.ext.test as dpytest
from discord.ext.test import callbacks

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bot.config import Settings  # noqa: E402
from bot.conversation import ConvKey, Incoming  # noqa: E402
from bot.engine import Engine  # noqa: E402
from bot.platforms.discord_bot import create_bot  # noqa: E402
from bot.platforms.discord_reply import EDIT_INTERVAL  # noqa: E402
from dpytest_harness import configure_dpytest  # noqa: E402
from openai_server import OpenAIServer, Reply  # noqa: E402

TOKENS = 600
TOKENS_PER_SECOND = 50
RUNS = 20


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with OpenAIServer() as server:
            shutil.copytree(ROOT / "personas", Path(tmp) / "personas")
            settings = Settings(
                _env_file=None, PERSONABOT_DATA_DIR=Path(tmp) / "data", PERSONABOT_PERSONAS_DIR=Path(tmp) / "personas",
                OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=server.base_url,
            )
            engine = await Engine.create(settings, knowledge=False)
            try:
                await run(engine, server)
            finally:
                await engine.close()


async def run(engine: Engine, server: OpenAIServer) -> None:
    bot = create_bot(engine, engine.settings)  # the production edit interval
    await configure_dpytest(bot, guilds=1, text_channels=1, voice_channels=0, members=1)
    channel, member = dpytest.get_config().channels[0], dpytest.get_config().members[0]

    events: list[tuple[float, str]] = []
    queue_message = callbacks.get_callback("send_message")

    async def on_send(message):
        events.append((time.perf_counter(), "send"))
        await queue_message(message)

    async def on_edit(channel, message, fields):
        events.append((time.perf_counter(), "edit"))

    callbacks.set_callback(on_send, "send_message")
    callbacks.set_callback(on_edit, "edit_message")

    # 1. a long streamed reply
    words = " ".join(f"word{i}" for i in range(TOKENS))
    server.script(Reply(text=words, chunk_delay=1 / TOKENS_PER_SECOND))
    events.clear()
    start = time.perf_counter()
    await dpytest.message(f"<@{bot.user.id}> tell me a long story", channel=channel, member=member)
    total = time.perf_counter() - start
    edits = [t for t, kind in events if kind == "edit"]
    times = [t for t, _ in events]
    gaps = [b - a for a, b in zip(times, times[1:])]
    busiest = max(sum(1 for u in times if t <= u < t + 5) for t in times)
    print(f"600-token reply at {TOKENS_PER_SECOND} tok/s: {total:.1f} s, {sum(k == 'send' for _, k in events)} "
          f"message(s), {len(edits)} edits; seconds between requests min {min(gaps):.2f} / median "
          f"{statistics.median(gaps):.2f} (interval {EDIT_INTERVAL} s); busiest 5 s window: {busiest} requests; "
          f"last text shown {total - TOKENS / TOKENS_PER_SECOND:.1f} s after the model finished")

    # 2. time to first visible text with an instant model
    server.reply_with(lambda messages: "Sure: here is a quick answer.")
    key = ConvKey("bench", "bench", "baseline")
    baseline, adapter = [], []
    for i in range(RUNS):
        start, first_piece = time.perf_counter(), None
        async for _ in engine.reply(Incoming(key, "bench", f"question {i}")):
            first_piece = first_piece or time.perf_counter() - start
        baseline.append(first_piece)
        events.clear()
        start = time.perf_counter()
        await dpytest.message(f"<@{bot.user.id}> question {i}", channel=channel, member=member)
        first = next(t for t, kind in events if kind == "send")
        adapter.append(first - start)
    engine_ms, discord_ms = statistics.median(baseline) * 1000, statistics.median(adapter) * 1000
    print(f"first visible text, instant model (median of {RUNS}): {discord_ms:.1f} ms from message to Discord send; "
          f"engine alone {engine_ms:.1f} ms to first piece; ratio {discord_ms / engine_ms:.2f}x")
    await dpytest.empty_queue()


if __name__ == "__main__":
    asyncio.run(main())
