"""Slack Web API calls per streamed reply: under the bot's own look, as a persona, and in an assistant thread.

Runs the real bolt app over HTTP against the fake Web API (tests/slack_api.py), the real engine and SQLite
history, and the local OpenAI-compatible server streaming a reply in four pieces 1.1 s apart, so Slack's
one-write-a-second pacing lets each piece out as its own write (a start, then about three appends). Prints
the calls each reply made, by method; the Discord counts are asserted by tests/test_discord.py
(`test_a_streamed_reply_*`).

    .venv/bin/python bench/reply_calls.py
"""
from __future__ import annotations

import asyncio
import collections
import sys
import tempfile
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bot.engine import Engine  # noqa: E402
from openai_server import OpenAIServer, Reply  # noqa: E402
from slack_api import BOT_USER, FakeSlackApi, SlackApp, served, slack_settings  # noqa: E402

PERSONAS = {
    "plain": "name: plain\nsystem: You help.\n",  # no display_name or avatar: looks like the bot itself
    "myna": "name: myna\ndisplay_name: Polly\navatar: polly.png\nsystem: You repeat things.\n"
            "examples:\n  - {role: user, content: Say hi.}\n  - {role: assistant, content: Hi.}\n",
}
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
STREAMED = Reply(chunks=["One, ", "two, ", "three, ", "four."], chunk_delay=1.1)


async def measure(persona: str, kind: str) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        async with OpenAIServer() as model, FakeSlackApi() as api:
            settings = slack_settings(Path(tmp), PERSONAS, model.base_url, api, PERSONABOT_DEFAULT_PERSONA=persona,
                                      PERSONABOT_PUBLIC_URL="https://bot.example.com")
            (settings.personas_dir / "polly.png").write_bytes(PNG)
            engine = await Engine.create(settings, knowledge=False)
            try:
                async with served(engine, settings) as url, aiohttp.ClientSession() as session:
                    slack = SlackApp(f"{url}/slack/events", session)
                    model.script(STREAMED)
                    if kind == "assistant":
                        thread = "1700000020.000001"
                        await slack.event({"type": "assistant_thread_started", "event_ts": thread,
                                           "assistant_thread": {"user_id": "U1", "channel_id": "D1",
                                                                "thread_ts": thread, "context": {}}})
                        await api.wait_for(lambda: api.calls_to("assistant.threads.setSuggestedPrompts"))
                        await slack.event({"type": "message", "channel_type": "im", "channel": "D1", "user": "U1",
                                           "text": "say something", "ts": "1700000020.000100",
                                           "thread_ts": thread})
                    else:
                        await slack.event({"type": "app_mention", "user": "U1", "text": f"<@{BOT_USER}> go",
                                           "ts": "1700000001.000001", "channel": "C1",
                                           "event_ts": "1700000001.000001"})
                    await api.wait_for(lambda: api.calls_to("chat.stopStream"), timeout=30)
                    await asyncio.sleep(0.5)  # anything sent after the stream ends
                    looks = {k: v for call in api.calls_to("chat.startStream") for k, v in call.params.items()
                             if k in ("username", "icon_url", "icon_emoji")}
                    return {**collections.Counter(call.method for call in api.calls), "look": looks}
            finally:
                await engine.close()


async def main() -> None:
    for title, persona, kind in (("channel mention, persona without name or avatar", "plain", "mention"),
                                 ("channel mention, persona Polly with a file avatar", "myna", "mention"),
                                 ("assistant thread (DM), persona Polly", "myna", "assistant")):
        calls = await measure(persona, kind)
        look = calls.pop("look")
        print(f"{title}: {sum(calls.values())} calls")
        for method, count in sorted(calls.items()):
            print(f"  {method:42} {count}")
        print(f"  customize fields on the stream: {look}")


if __name__ == "__main__":
    asyncio.run(main())
